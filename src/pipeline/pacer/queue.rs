//! The pacer's frame queue: synthesized audio at the caller's rate waiting to be sent, with the
//! text unit each sample speaks. A pure type: frames come off the front, and each says which
//! units its samples belong to and which units it completes (so their marks can follow).

use std::collections::VecDeque;

/// Audio waiting to be sent, and whose it is.
#[derive(Debug, Default)]
pub(crate) struct FrameQueue {
    samples: VecDeque<f32>,
    /// The unit of each sample in `samples`, as runs: (unit, samples).
    runs: VecDeque<(usize, usize)>,
    /// Whether the newest unit is complete, so a short tail may go out on its own.
    tail_complete: bool,
}

/// One frame off the queue.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueuedFrame {
    pub samples: Vec<f32>,
    /// (unit, offset in the frame, samples) for each unit in it, oldest first.
    pub runs: Vec<(usize, usize, usize)>,
    /// Units whose last sample is in this frame and whose synthesis has finished.
    pub finished: Vec<usize>,
}

impl FrameQueue {
    pub(crate) fn len(&self) -> usize {
        self.samples.len()
    }

    /// Adds audio of `unit`; `done` marks the unit's last audio. When the unit is done, returns
    /// how many of its samples are still queued (for the playout ledger's total).
    pub(crate) fn push(&mut self, unit: usize, samples: Vec<f32>, done: bool) -> Option<u64> {
        if !samples.is_empty() {
            match self.runs.back_mut() {
                Some((u, k)) if *u == unit => *k += samples.len(),
                _ => self.runs.push_back((unit, samples.len())),
            }
            self.samples.extend(samples);
        }
        self.tail_complete = done;
        done.then(|| {
            self.runs
                .iter()
                .filter(|(u, _)| *u == unit)
                .map(|&(_, k)| k as u64)
                .sum()
        })
    }

    /// Puts audio taken back after it was sent at the front again, oldest sample first: `runs`
    /// are its (unit, samples), oldest first.
    pub(crate) fn unpop(&mut self, samples: &[f32], runs: &[(usize, usize)]) {
        for &x in samples.iter().rev() {
            self.samples.push_front(x);
        }
        for &(unit, k) in runs.iter().rev() {
            match self.runs.front_mut() {
                Some((u, n)) if *u == unit => *n += k,
                _ => self.runs.push_front((unit, k)),
            }
        }
    }

    /// Whether a frame may go now: a whole one, or a short tail once nothing more can join it
    /// (its unit is done, or the audio stream has ended).
    pub(crate) fn sendable(&self, frame_len: usize, input_open: bool) -> bool {
        self.samples.len() >= frame_len
            || (!self.samples.is_empty() && (self.tail_complete || !input_open))
    }

    /// Takes up to `n` samples as a frame, attributing them to units oldest first.
    pub(crate) fn pop(&mut self, n: usize) -> QueuedFrame {
        let n = n.min(self.samples.len());
        let samples: Vec<f32> = self.samples.drain(..n).collect();
        let mut runs = Vec::new();
        let mut finished = Vec::new();
        let mut offset = 0;
        while offset < n {
            let Some((unit, avail)) = self.runs.front_mut() else {
                break;
            };
            let take = (n - offset).min(*avail);
            runs.push((*unit, offset, take));
            *avail -= take;
            offset += take;
            if *avail == 0 {
                let unit = *unit;
                self.runs.pop_front();
                // Complete only if synthesis finished it (nothing more will come).
                let more = self.runs.iter().any(|(v, _)| *v == unit);
                if !more && (self.tail_complete || !self.runs.is_empty()) {
                    finished.push(unit);
                }
            }
        }
        QueuedFrame {
            samples,
            runs,
            finished,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Op {
        Push(usize, usize, bool, Option<u64>),
        /// pop(n) → (runs, finished)
        Pop(usize, &'static [(usize, usize, usize)], &'static [usize]),
        /// sendable(frame_len, input_open) → expected
        Sendable(usize, bool, bool),
        /// unpop: (unit, samples) taken back, oldest first
        Unpop(&'static [(usize, usize)]),
    }
    use Op::*;

    #[test]
    fn table() {
        let cases: &[(&str, &[Op])] = &[
            (
                "a unit spans frames and is finished by the frame holding its last sample",
                &[
                    Push(0, 30, true, Some(30)),
                    Push(1, 25, false, None),
                    Pop(20, &[(0, 0, 20)], &[]),
                    Pop(20, &[(0, 0, 10), (1, 10, 10)], &[0]),
                    Sendable(20, true, false),
                    Pop(20, &[(1, 0, 15)], &[]),
                ],
            ),
            (
                "a short tail waits for more audio of its unit, then goes once the unit is done",
                &[
                    Push(0, 10, false, None),
                    Sendable(20, true, false),
                    Push(0, 5, true, Some(15)),
                    Sendable(20, true, true),
                    Pop(20, &[(0, 0, 15)], &[0]),
                    Sendable(20, true, false),
                ],
            ),
            (
                "a short tail goes when the stream ends, but its unfinished unit is not marked",
                &[
                    Push(3, 7, false, None),
                    Sendable(20, false, true),
                    Pop(20, &[(3, 0, 7)], &[]),
                ],
            ),
            (
                "samples of one unit pushed in pieces stay one run",
                &[
                    Push(0, 4, false, None),
                    Push(0, 4, false, None),
                    Push(0, 4, true, Some(12)),
                    Pop(12, &[(0, 0, 12)], &[0]),
                ],
            ),
            (
                "audio taken back goes out first again, and its unit is finished again",
                &[
                    Push(0, 30, true, Some(30)),
                    Push(1, 25, false, None),
                    Pop(40, &[(0, 0, 30), (1, 30, 10)], &[0]),
                    Unpop(&[(0, 10), (1, 10)]),
                    Pop(40, &[(0, 0, 10), (1, 10, 25)], &[0]),
                ],
            ),
            (
                "an empty unit adds no run",
                &[
                    Push(0, 0, true, Some(0)),
                    Sendable(1, true, false),
                    Push(1, 3, true, Some(3)),
                    Pop(10, &[(1, 0, 3)], &[1]),
                ],
            ),
        ];
        for (name, ops) in cases {
            let mut q = FrameQueue::default();
            let mut next = 0.0f32;
            for (i, op) in ops.iter().enumerate() {
                match *op {
                    Push(unit, n, done, want) => {
                        let samples: Vec<f32> = (0..n).map(|k| next + k as f32).collect();
                        next += n as f32;
                        assert_eq!(q.push(unit, samples, done), want, "{name}: op {i}");
                    }
                    Pop(n, runs, finished) => {
                        let before = q.len();
                        let f = q.pop(n);
                        assert_eq!(f.runs, runs, "{name}: op {i}");
                        assert_eq!(f.finished, finished, "{name}: op {i}");
                        assert_eq!(f.samples.len(), before - q.len(), "{name}: op {i}");
                    }
                    Sendable(frame, open, want) => {
                        assert_eq!(q.sendable(frame, open), want, "{name}: op {i}");
                    }
                    Unpop(runs) => {
                        let n: usize = runs.iter().map(|r| r.1).sum();
                        q.unpop(&vec![0.0; n], runs);
                    }
                }
            }
        }
    }

    #[test]
    fn samples_come_out_in_order() {
        let mut q = FrameQueue::default();
        q.push(0, vec![1.0, 2.0, 3.0], true);
        q.push(1, vec![4.0, 5.0], true);
        assert_eq!(q.pop(2).samples, vec![1.0, 2.0]);
        assert_eq!(q.pop(5).samples, vec![3.0, 4.0, 5.0]);
        assert_eq!(q.len(), 0);
        q.push(2, vec![8.0, 9.0], true);
        q.unpop(&[6.0, 7.0], &[(1, 2)]);
        assert_eq!(q.pop(4).samples, vec![6.0, 7.0, 8.0, 9.0]);
    }
}
