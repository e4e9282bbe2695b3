//! The waiting room: websockets upgraded but not yet started (no start message yet). They hold
//! no call slot, but each holds a seat here until it starts or its start deadline passes, and
//! the room is bounded (`server.max_pending_sockets`). So one client must not fill it:
//! - every source address (an IPv4 address, or an IPv6 /64, which one subscriber gets) holds at
//!   most `max_pending_per_address` seats;
//! - phone streams have a share of the room that web sockets cannot take
//!   (`pending_phone_share`), so web traffic cannot shut phone calls out;
//! - the start deadline shrinks as the room fills: the full `start_timeout_ms` up to half full,
//!   then in proportion to the room left, down to one second, so seats held by idle sockets come
//!   back sooner when they are scarce;
//! - a refusal is remembered for [`PRESSURE_WINDOW`], so `/health` can say the server is
//!   refusing callers (`degraded`) instead of `ok`.
//!
//! The count per address ([`PerAddress`]) also caps the listener's HTTP connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// How long after a refusal `/health` still reports pressure.
pub const PRESSURE_WINDOW: Duration = Duration::from_secs(10);

/// The shortest deadline a full pool gives (the start deadline here, the listener's header
/// deadline).
const MIN_TIMEOUT_WHEN_FULL: Duration = Duration::from_secs(1);

/// Which door a socket came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// A browser or app (`/conversation`).
    Web,
    /// A phone call's media stream (`/twilio/stream`).
    Phone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    /// Seats in all.
    pub capacity: usize,
    /// Seats only phone streams may take.
    pub phone_share: usize,
    /// Seats one source address may hold; 0 for no cap (behind a proxy that does not say who
    /// its clients are, every socket comes from the proxy).
    pub per_address: usize,
    /// The start deadline while the room is at most half full.
    pub start_timeout: Duration,
}

/// Why a socket got no seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every seat its door may use is taken.
    Full,
    /// Its address holds its share already.
    AddressFull,
}

/// Where a source address stands for a per-address share: IPv4 by address, IPv6 by /64, which
/// one subscriber gets (an IPv4-mapped IPv6 address counts as the IPv4 one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl From<IpAddr> for AddressKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    AddressKey::V6Prefix(o[..8].try_into().expect("16 bytes"))
                }
            },
        }
    }
}

/// Holders per source address, each capped; the waiting room's seats and the listener's
/// connections are counted by it. An entry leaves with its last holder.
#[derive(Clone, Default)]
pub(crate) struct PerAddress(Arc<Mutex<HashMap<AddressKey, usize>>>);

/// One holder's place in [`PerAddress`]; given back when dropped.
pub(crate) struct AddressSlot(PerAddress, AddressKey);

impl PerAddress {
    /// A place for one more holder from `ip`, unless it has `max` already (0: no cap).
    pub(crate) fn claim(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let key = AddressKey::from(ip);
        let mut map = self.0.lock().expect("per-address lock");
        let n = map.entry(key).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), key))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = (self.0).0.lock().expect("per-address lock");
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[derive(Default)]
struct Seats {
    web: usize,
    phone: usize,
    last_refusal: Option<Instant>,
}

pub struct WaitingRoom {
    settings: RoomSettings,
    seats: Mutex<Seats>,
    addresses: PerAddress,
    /// Told when the last seat is given back (shutdown waits for it).
    emptied: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

/// What `/health` says of the room.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// Seats taken, out of the capacity.
    pub fill: f64,
    /// A socket was refused within [`PRESSURE_WINDOW`].
    pub refusing: bool,
}

impl WaitingRoom {
    pub fn new(settings: RoomSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(WaitingRoom {
            settings,
            seats: Mutex::default(),
            addresses: PerAddress::default(),
            emptied: tokio::sync::Notify::new(),
            metrics,
        })
    }

    /// A seat for a socket from `addr` at `door`, with the start deadline it gets now.
    pub fn enter(self: &Arc<Self>, door: Door, addr: IpAddr) -> Result<Seat, Refusal> {
        let s = &self.settings;
        let mut seats = self.seats.lock().expect("waiting room lock");
        let taken = seats.web + seats.phone;
        let room_for_door = match door {
            Door::Web => seats.web < s.capacity.saturating_sub(s.phone_share) && taken < s.capacity,
            Door::Phone => taken < s.capacity,
        };
        let claimed = if room_for_door {
            self.addresses
                .claim(addr, s.per_address)
                .ok_or(Refusal::AddressFull)
        } else {
            Err(Refusal::Full)
        };
        let address = match claimed {
            Ok(slot) => slot,
            Err(r) => {
                seats.last_refusal = Some(Instant::now());
                return Err(r);
            }
        };
        match door {
            Door::Web => seats.web += 1,
            Door::Phone => seats.phone += 1,
        }
        let start_timeout = shrinking_timeout(s.start_timeout, taken + 1, s.capacity);
        drop(seats);
        self.metrics.pending_sockets.inc();
        Ok(Seat {
            room: self.clone(),
            door,
            _address: address,
            start_timeout,
        })
    }

    /// Returns once no socket holds a seat.
    pub async fn emptied(&self) {
        loop {
            // Registered before the check, so a seat given back in between still wakes it.
            let given_back = self.emptied.notified();
            {
                let seats = self.seats.lock().expect("waiting room lock");
                if seats.web + seats.phone == 0 {
                    return;
                }
            }
            given_back.await;
        }
    }

    pub fn pressure(&self) -> Pressure {
        let seats = self.seats.lock().expect("waiting room lock");
        Pressure {
            fill: (seats.web + seats.phone) as f64 / self.settings.capacity.max(1) as f64,
            refusing: seats
                .last_refusal
                .is_some_and(|t| t.elapsed() < PRESSURE_WINDOW),
        }
    }
}

/// The deadline a client gets when it takes the `taken`-th of `capacity` places in a pool (the
/// waiting room's seats, the listener's connections): `full` up to half the pool, then in
/// proportion to the places left, never under a second (or `full`, if that is shorter).
pub(crate) fn shrinking_timeout(full: Duration, taken: usize, capacity: usize) -> Duration {
    let half = capacity.div_ceil(2);
    if taken <= half || capacity == 0 {
        return full;
    }
    let left = capacity.saturating_sub(taken) as u32;
    let span = (capacity - half) as u32;
    (full * left / span).max(MIN_TIMEOUT_WHEN_FULL.min(full))
}

/// One socket's seat; given back when dropped (the call started, or the socket went away).
pub struct Seat {
    room: Arc<WaitingRoom>,
    door: Door,
    /// Its place in its address's share, given back with it.
    _address: AddressSlot,
    start_timeout: Duration,
}

impl Seat {
    /// How long this socket may wait for its start message.
    pub fn start_timeout(&self) -> Duration {
        self.start_timeout
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut seats = self.room.seats.lock().expect("waiting room lock");
        match self.door {
            Door::Web => seats.web -= 1,
            Door::Phone => seats.phone -= 1,
        }
        let empty = seats.web + seats.phone == 0;
        drop(seats);
        self.room.metrics.pending_sockets.dec();
        if empty {
            self.room.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(capacity: usize, phone_share: usize, per_address: usize) -> Arc<WaitingRoom> {
        WaitingRoom::new(
            RoomSettings {
                capacity,
                phone_share,
                per_address,
                start_timeout: Duration::from_secs(10),
            },
            Arc::new(Metrics::new()),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_capped_and_slots_return() {
        let p = PerAddress::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = p.claim(ip, 2).unwrap();
        let _b = p.claim(ip, 2).unwrap();
        assert!(p.claim(ip, 2).is_none());
        assert!(p.claim("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(p.claim(ip, 2).is_some());
        // IPv6 by /64: fresh addresses of one prefix share its cap.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let _c = p.claim(v6("2001:db8:0:1::1"), 2).unwrap();
        let _d = p.claim(v6("2001:db8:0:1::2"), 2).unwrap();
        assert!(p.claim(v6("2001:db8:0:1:ffff::3"), 2).is_none());
        assert!(p.claim(v6("2001:db8:0:2::1"), 2).is_some());
        // No cap at all.
        for _ in 0..10 {
            std::mem::forget(p.claim(ip, 0).unwrap());
        }
    }

    #[test]
    fn one_address_holds_only_its_share_and_seats_come_back() {
        let r = room(8, 0, 2);
        let a = r.enter(Door::Web, ip("10.0.0.1")).unwrap();
        let _b = r.enter(Door::Web, ip("10.0.0.1")).unwrap();
        assert_eq!(
            r.enter(Door::Web, ip("10.0.0.1")).err(),
            Some(Refusal::AddressFull)
        );
        assert!(r.pressure().refusing);
        let _c = r.enter(Door::Web, ip("10.0.0.2")).unwrap();
        drop(a);
        let _d = r.enter(Door::Web, ip("10.0.0.1")).unwrap();
        assert_eq!(r.metrics.pending_sockets.get(), 3);
    }

    #[test]
    fn an_ipv6_64_is_one_address_and_mapped_ipv4_is_its_ipv4() {
        let r = room(8, 0, 2);
        let _a = r.enter(Door::Web, ip("2001:db8:1:2::1")).unwrap();
        let _b = r.enter(Door::Web, ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            r.enter(Door::Web, ip("2001:db8:1:2:abcd::1")).err(),
            Some(Refusal::AddressFull),
            "another address in the same /64"
        );
        let _c = r.enter(Door::Web, ip("2001:db8:1:3::1")).unwrap();
        let _d = r.enter(Door::Web, ip("192.0.2.7")).unwrap();
        let _e = r.enter(Door::Web, ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(
            r.enter(Door::Web, ip("192.0.2.7")).err(),
            Some(Refusal::AddressFull)
        );
    }

    #[test]
    fn web_sockets_cannot_take_the_phone_share() {
        let r = room(4, 1, 0);
        let web: Vec<Seat> = (0..3)
            .map(|i| r.enter(Door::Web, ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        assert_eq!(
            r.enter(Door::Web, ip("10.0.1.1")).err(),
            Some(Refusal::Full)
        );
        let phone = r.enter(Door::Phone, ip("10.0.1.2")).unwrap();
        assert_eq!(
            r.enter(Door::Phone, ip("10.0.1.3")).err(),
            Some(Refusal::Full)
        );
        assert_eq!(r.pressure().fill, 1.0);
        drop((web, phone));
        assert_eq!(r.pressure().fill, 0.0);
    }

    /// The full deadline up to half the room, then in proportion to the seats left, never
    /// under one second.
    #[test]
    fn the_start_deadline_shrinks_as_the_room_fills() {
        let full = Duration::from_secs(10);
        assert_eq!(shrinking_timeout(full, 1, 256), full);
        assert_eq!(shrinking_timeout(full, 128, 256), full);
        assert_eq!(shrinking_timeout(full, 192, 256), Duration::from_secs(5));
        assert_eq!(shrinking_timeout(full, 256, 256), Duration::from_secs(1));
        assert_eq!(
            shrinking_timeout(Duration::from_millis(300), 256, 256),
            Duration::from_millis(300),
            "never longer than the configured deadline"
        );
        let r = room(4, 0, 0);
        let seats: Vec<Seat> = (0..4)
            .map(|i| r.enter(Door::Web, ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        let deadlines: Vec<Duration> = seats.iter().map(Seat::start_timeout).collect();
        assert_eq!(
            deadlines,
            [full, full, Duration::from_secs(5), Duration::from_secs(1)]
        );
    }
}
