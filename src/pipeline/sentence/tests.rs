//! Unit tests of the sentence accumulator: the English table, other languages, character-safe
//! splits, linear work and random text.

use super::*;

/// Feeds `text` word-piece by word-piece (as a model streams) and collects every unit.
fn units(text: &str, settings: SentenceSettings) -> Vec<String> {
    let mut acc = SentenceAccumulator::new(settings);
    let mut out = Vec::new();
    let mut piece = String::new();
    for ch in text.chars() {
        if ch.is_whitespace() && !piece.is_empty() {
            out.extend(acc.push(&piece));
            piece.clear();
        }
        piece.push(ch);
    }
    out.extend(acc.push(&piece));
    out.extend(acc.finish());
    out
}

fn no_clauses() -> SentenceSettings {
    SentenceSettings {
        first_clause_words: 0,
        ..Default::default()
    }
}

#[test]
fn table() {
    let cases: &[(&str, &[&str])] = &[
        (
            "Hello there. How are you?",
            &["Hello there.", "How are you?"],
        ),
        ("Wow! Really? Yes.", &["Wow!", "Really?", "Yes."]),
        (
            "Mr. Smith met Dr. Jones today. Fine.",
            &["Mr. Smith met Dr. Jones today.", "Fine."],
        ),
        (
            "Use tools, e.g. a hammer. Done.",
            &["Use tools, e.g. a hammer.", "Done."],
        ),
        (
            "The U.S. economy grew. Good.",
            &["The U.S. economy grew.", "Good."],
        ),
        ("Pi is 3.14 roughly. Yes.", &["Pi is 3.14 roughly.", "Yes."]),
        ("Well... maybe not. Ok.", &["Well... maybe not.", "Ok."]),
        (
            "I waited... Then it rang.",
            &["I waited...", "Then it rang."],
        ),
        (
            "He said \"stop.\" Then left.",
            &["He said \"stop.\"", "Then left."],
        ),
        ("(It works.) Next one.", &["(It works.)", "Next one."]),
        (
            "Steps:\n1. Open it.\n2. Close it.",
            &["Steps:", "1. Open it.", "2. Close it."],
        ),
        (
            "Items: 1. apples and 2. pears",
            &["Items: 1. apples and 2. pears"],
        ),
        ("Line one\nLine two", &["Line one", "Line two"]),
        (
            "J. R. R. Tolkien wrote it.",
            &["J. R. R. Tolkien wrote it."],
        ),
        (
            "It cost 1,000 dollars. Ok.",
            &["It cost 1,000 dollars.", "Ok."],
        ),
        (
            "I am 25. Next year I turn 26.",
            &["I am 25.", "Next year I turn 26."],
        ),
        ("Say no. Then go.", &["Say no.", "Then go."]),
        ("no ending punctuation", &["no ending punctuation"]),
        ("", &[]),
    ];
    for (input, want) in cases {
        assert_eq!(units(input, no_clauses()), *want, "input {input:?}");
    }
}

#[test]
fn first_clause_is_emitted_early_only_once() {
    let s = SentenceSettings {
        first_clause_words: 4,
        ..Default::default()
    };
    let cases: &[(&str, &[&str])] = &[
        (
            "Well I think that, all things considered, it works. Yes, it does.",
            &[
                "Well I think that,",
                "all things considered, it works.",
                "Yes, it does.",
            ],
        ),
        ("Hi, there. Ok.", &["Hi, there.", "Ok."]),
    ];
    for (input, want) in cases {
        assert_eq!(units(input, s), *want, "input {input:?}");
    }
}

#[test]
fn units_come_out_as_soon_as_the_next_token_starts() {
    let mut acc = SentenceAccumulator::new(no_clauses());
    assert!(acc.push("Hello").is_empty());
    assert!(acc.push(" world.").is_empty());
    assert_eq!(acc.push(" Next"), vec!["Hello world."]);
    assert_eq!(acc.finish().as_deref(), Some("Next"));
}

#[test]
fn long_runs_are_split_at_a_space() {
    let s = SentenceSettings {
        first_clause_words: 0,
        max_chars: 20,
    };
    let u = units("aaaa bbbb cccc dddd eeee ffff gggg", s);
    assert!(u.iter().all(|x| x.len() <= 20), "{u:?}");
    assert_eq!(u.join(" "), "aaaa bbbb cccc dddd eeee ffff gggg");
}

#[test]
fn reset_drops_pending_text() {
    let mut acc = SentenceAccumulator::new(no_clauses());
    acc.push("half a sent");
    acc.reset();
    assert_eq!(acc.finish(), None);
}

/// Feeds `text` in pieces of `n` characters and collects every unit.
fn units_by(text: &str, n: usize, settings: SentenceSettings) -> Vec<String> {
    let mut acc = SentenceAccumulator::new(settings);
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for piece in chars.chunks(n.max(1)) {
        out.extend(acc.push(&piece.iter().collect::<String>()));
    }
    out.extend(acc.finish());
    out
}

/// The units of `text`, checked to be the same however the text is split into tokens.
fn units_any_split(text: &str, settings: SentenceSettings) -> Vec<String> {
    let want = units(text, settings);
    for n in [1, 3, usize::MAX] {
        assert_eq!(
            units_by(text, n, settings),
            want,
            "{n}-char tokens of {text:?}"
        );
    }
    want
}

/// Every unit is non-empty, trimmed and short enough, and together they hold all the text.
fn assert_sound(input: &str, units: &[String], max_chars: usize) {
    for u in units {
        assert!(!u.is_empty() && u.trim() == u, "unit {u:?} of {input:?}");
        assert!(
            u.chars().count() <= max_chars,
            "unit {u:?} over {max_chars}"
        );
    }
    let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    assert_eq!(strip(&units.concat()), strip(input), "units {units:?}");
}

#[test]
fn other_languages_end_sentences_where_they_should() {
    let cases: &[(&str, &[&str])] = &[
        (
            "¿Qué tal? Muy bien, gracias. ¡Adiós!",
            &["¿Qué tal?", "Muy bien, gracias.", "¡Adiós!"],
        ),
        (
            "Das ist z. B. ein Test. Die Straße ist schön.",
            &["Das ist z. B. ein Test.", "Die Straße ist schön."],
        ),
        (
            "こんにちは。元気ですか？はい、元気です。",
            &["こんにちは。", "元気ですか？", "はい、元気です。"],
        ),
        ("I love it 😀. Next 🎉!", &["I love it 😀.", "Next 🎉!"]),
        (
            "Es kostet ca. 5 Euro bzw. mehr, z.B. Nr. 3 usw. Gut.",
            &["Es kostet ca. 5 Euro bzw. mehr, z.B. Nr. 3 usw. Gut."],
        ),
        (
            "Der Buchstabe z. Dann kam y.",
            &["Der Buchstabe z.", "Dann kam y."],
        ),
        (
            "La Sra. Díaz y la Srta. Ruiz. ¿Ud. o Uds. vienen? Sí.",
            &[
                "La Sra. Díaz y la Srta. Ruiz.",
                "¿Ud. o Uds. vienen?",
                "Sí.",
            ],
        ),
        ("你好！我很好。谢谢", &["你好！", "我很好。", "谢谢"]),
        (
            "彼は「行く。」と言った。次",
            &["彼は「行く。」", "と言った。", "次"],
        ),
        ("本当？！うん。 Yes.", &["本当？！", "うん。", "Yes."]),
        ("円周率は３．１４です。", &["円周率は３．１４です。"]),
        ("Hi.\u{3000}Next one.", &["Hi.", "Next one."]),
    ];
    for (input, want) in cases {
        assert_eq!(
            units_any_split(input, no_clauses()),
            *want,
            "input {input:?}"
        );
    }
}

#[test]
fn a_cjk_end_is_cut_when_the_next_character_arrives() {
    let mut acc = SentenceAccumulator::new(no_clauses());
    assert!(acc.push("はい。").is_empty());
    assert!(acc.push("」").is_empty());
    assert_eq!(acc.push("次"), vec!["はい。」"]);
    assert_eq!(acc.finish().as_deref(), Some("次"));
}

#[test]
fn long_text_is_split_by_characters_never_bytes() {
    let s = SentenceSettings {
        first_clause_words: 0,
        max_chars: 20,
    };
    let long_word = format!("Go {} now.", "ß".repeat(50));
    let cases = [
        ("é".repeat(1000), true),
        ("😀".repeat(1000), true),
        ("あいうえおかきくけこさしすせそ".repeat(70), true),
        ("éé😀 ".repeat(300), false),
        ("ﾃｽﾄ です ".repeat(200), false),
        (long_word, false),
    ];
    for (input, solid) in &cases {
        let u = units_any_split(input, s);
        assert_sound(input, &u, 20);
        if *solid {
            assert_eq!(u.concat(), *input);
            assert!(u[..u.len() - 1].iter().all(|x| x.chars().count() == 20));
        } else if input.split_whitespace().all(|w| w.chars().count() <= 20) {
            let words: Vec<&str> = input.split_whitespace().collect();
            assert_eq!(u.join(" "), words.join(" "));
        }
    }
}

#[test]
fn finish_never_returns_more_than_max_chars() {
    let s = SentenceSettings {
        first_clause_words: 0,
        max_chars: 20,
    };
    let mut acc = SentenceAccumulator::new(s);
    assert_eq!(acc.push(&"a".repeat(25)), vec!["a".repeat(20)]);
    assert_eq!(acc.finish(), Some("a".repeat(5)));
    assert_eq!(acc.push(&"b".repeat(20)), Vec::<String>::new());
    assert_eq!(acc.finish(), Some("b".repeat(20)));
}

#[test]
fn spaces_after_a_possible_end_are_read_only_so_far() {
    let few = format!("It is 1.{}apples", " ".repeat(10));
    let many = format!("It is 1.{}apples", " ".repeat(40));
    let cases: &[(&str, &[&str])] = &[
        (&few, &[few.as_str()]),
        (&many, &["It is 1.", "apples"]),
        ("It is 1.  \n  apples", &["It is 1.", "apples"]),
    ];
    for (input, want) in cases {
        assert_eq!(
            units_any_split(input, no_clauses()),
            *want,
            "input {input:?}"
        );
    }
}

#[test]
fn work_stays_linear_in_the_input() {
    let n = 200_000;
    let fill = |unit: &str| unit.repeat(n / unit.chars().count());
    let texts = [
        (
            "short sentences",
            fill("Hi there. Mr. X met Dr. Y! Ok? 1. a z. B. so... "),
        ),
        ("first clauses", fill("One two three four, five. ")),
        ("one run, no space", "a".repeat(n)),
        ("one run of é", "é".repeat(n)),
        ("1. then spaces", format!("1.{}", " ".repeat(n))),
        ("ends then spaces", format!("It is 1.{}", " ".repeat(n))),
        ("ellipses", fill("Wait… then. ")),
        ("cjk", fill("はい。」")),
    ];
    for (name, text) in &texts {
        for one_token in [true, false] {
            let mut acc = SentenceAccumulator::new(SentenceSettings::default());
            if one_token {
                acc.push(text);
            } else {
                let mut b = [0; 4];
                for c in text.chars() {
                    acc.push(c.encode_utf8(&mut b));
                }
            }
            acc.finish();
            let ratio = acc.examined as f64 / text.chars().count() as f64;
            eprintln!("{name}, one token {one_token}: {ratio:.3} examinations per char");
            assert!(ratio <= 4.0, "{name}: {ratio}");
        }
    }
}

/// SplitMix64: a deterministic generator, enough for fuzzing without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

#[test]
fn random_text_keeps_every_invariant() {
    let alphabet: Vec<char> = "aBz Z  ..!?,\n\té ß。😀\"」1".chars().collect();
    let mut rng = Rng(7);
    for _ in 0..3000 {
        let len = rng.below(300);
        let input: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let settings = SentenceSettings {
            first_clause_words: rng.below(6),
            max_chars: 1 + rng.below(40),
        };
        let mut acc = SentenceAccumulator::new(settings);
        let mut got = Vec::new();
        let chars: Vec<char> = input.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let n = 1 + rng.below(8);
            let token: String = chars[i..(i + n).min(chars.len())].iter().collect();
            got.extend(acc.push(&token));
            i += n;
        }
        got.extend(acc.finish());
        assert_sound(&input, &got, settings.max_chars);
        assert_eq!(got, units_by(&input, usize::MAX, settings), "{input:?}");
    }
}
