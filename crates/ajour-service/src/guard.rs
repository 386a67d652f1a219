//! Bounds on online password guessing: failed logins are counted per client address and per
//! device, and past a limit within a window the address (or the device, for everyone but the
//! address it last logged in from) is answered "too many requests" for a while, without a
//! password being checked.
//!
//! Hand-written rather than a rate-limiting crate's: only failures count (a device sends one
//! status per block, thousands of successes), and a device's last good address must pass while
//! the device is locked, so an attacker cannot keep a working device out.

use ajour_registry::Key;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Limits on failed logins. A limit of 0 turns that side off.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Failed logins from one address within `window` before it is locked out.
    pub address_failures: u32,
    /// Failed logins for one device within `window` before it is locked out.
    pub device_failures: u32,
    pub window: Duration,
    /// How long a lockout lasts.
    pub lockout: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            address_failures: 30,
            device_failures: 10,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(60),
        }
    }
}

/// Entries kept per side: an attacker spraying names or addresses costs bounded memory.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Default)]
struct Record {
    window_start: Option<Instant>,
    failures: u32,
    locked_until: Option<Instant>,
    /// The address this device last logged in from (devices only).
    trusted: Option<IpAddr>,
}

impl Record {
    fn locked(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Count a failure; true when it starts a lockout.
    fn fail(&mut self, now: Instant, config: &GuardConfig, limit: u32) -> bool {
        if self.window_start.is_none_or(|start| now - start >= config.window) {
            self.window_start = Some(now);
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures >= limit {
            self.failures = 0;
            self.window_start = None;
            self.locked_until = Some(now + config.lockout);
            return true;
        }
        false
    }

    fn idle(&self, now: Instant, config: &GuardConfig) -> bool {
        self.locked(now).is_none()
            && self.trusted.is_none()
            && self.window_start.is_none_or(|start| now - start >= config.window)
    }
}

/// Which side refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockedBy {
    Address,
    Device,
}

pub(crate) struct LoginGuard {
    config: GuardConfig,
    addresses: Mutex<HashMap<IpAddr, Record>>,
    devices: Mutex<HashMap<Key, Record>>,
}

/// IPv6 clients hold whole /64 networks: count them as one address.
fn client(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
        IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
        v4 => v4,
    }
}

fn entry<'m, K: Hash + Eq + Clone>(
    map: &'m mut HashMap<K, Record>,
    key: &K,
    now: Instant,
    config: &GuardConfig,
) -> Option<&'m mut Record> {
    if !map.contains_key(key) && map.len() >= MAX_TRACKED {
        map.retain(|_, record| !record.idle(now, config));
        if map.len() >= MAX_TRACKED {
            // Full of live entries: stop tracking new ones rather than grow without bound.
            return None;
        }
    }
    Some(map.entry(key.clone()).or_default())
}

impl LoginGuard {
    pub fn new(config: GuardConfig) -> Self {
        Self {
            config,
            addresses: Mutex::default(),
            devices: Mutex::default(),
        }
    }

    /// Whether a login for `device` from `address` may be checked at all; when not, for how
    /// long it will be refused.
    pub fn admit(&self, device: &Key, address: Option<IpAddr>) -> Result<(), (LockedBy, Duration)> {
        let now = Instant::now();
        self.admit_address(address)
            .map_err(|left| (LockedBy::Address, left))?;
        let address = address.map(client);
        if let Some(record) = self.devices.lock().unwrap().get(device) {
            if let Some(left) = record.locked(now) {
                if address.is_none() || record.trusted != address {
                    return Err((LockedBy::Device, left));
                }
            }
        }
        Ok(())
    }

    /// Whether a login from `address` may be checked at all, whatever device it is for (before
    /// the device is known, as when a client certificate names it); when not, for how long.
    pub fn admit_address(&self, address: Option<IpAddr>) -> Result<(), Duration> {
        let Some(address) = address.map(client) else {
            return Ok(());
        };
        match self
            .addresses
            .lock()
            .unwrap()
            .get(&address)
            .and_then(|r| r.locked(Instant::now()))
        {
            Some(left) => Err(left),
            None => Ok(()),
        }
    }

    /// Count a failed login from `address`, for `device` when it exists.
    pub fn failed(&self, device: Option<&Key>, address: Option<IpAddr>) {
        let now = Instant::now();
        let config = &self.config;
        if let (Some(address), true) = (address.map(client), config.address_failures > 0) {
            let mut addresses = self.addresses.lock().unwrap();
            if let Some(record) = entry(&mut addresses, &address, now, config) {
                if record.fail(now, config, config.address_failures) {
                    tracing::warn!(%address, lockout = ?config.lockout, "too many failed logins from one address");
                }
            }
        }
        if let (Some(device), true) = (device, config.device_failures > 0) {
            let mut devices = self.devices.lock().unwrap();
            if let Some(record) = entry(&mut devices, device, now, config) {
                if record.fail(now, config, config.device_failures) {
                    tracing::warn!(key = %device, lockout = ?config.lockout, "too many failed logins for one device");
                }
            }
        }
    }

    /// A successful login: the device's address is trusted through a lockout of the device.
    pub fn succeeded(&self, device: &Key, address: Option<IpAddr>) {
        let Some(address) = address.map(client) else {
            return;
        };
        if self.config.device_failures == 0 {
            return;
        }
        let now = Instant::now();
        let mut devices = self.devices.lock().unwrap();
        // The common case (same address as before) takes no write.
        if devices.get(device).is_some_and(|r| r.trusted == Some(address)) {
            return;
        }
        if let Some(record) = entry(&mut devices, device, now, &self.config) {
            record.trusted = Some(address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ajour_registry::{AppName, DeviceName};

    fn key(name: &str) -> Key {
        Key::Device(AppName::parse("app").unwrap(), DeviceName::parse(name).unwrap())
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn config() -> GuardConfig {
        GuardConfig {
            address_failures: 3,
            device_failures: 2,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_is_locked_out_after_its_failures_and_let_in_again() {
        let guard = LoginGuard::new(config());
        for _ in 0..2 {
            guard.failed(None, ip("10.0.0.1"));
            assert!(guard.admit(&key("d"), ip("10.0.0.1")).is_ok());
        }
        guard.failed(None, ip("10.0.0.1"));
        let (by, left) = guard.admit(&key("d"), ip("10.0.0.1")).unwrap_err();
        assert_eq!((by, left), (LockedBy::Address, Duration::from_secs(30)));
        assert!(
            guard.admit(&key("d"), ip("10.0.0.2")).is_ok(),
            "other addresses are not affected"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(guard.admit(&key("d"), ip("10.0.0.1")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let guard = LoginGuard::new(config());
        guard.failed(None, ip("10.0.0.1"));
        guard.failed(None, ip("10.0.0.1"));
        tokio::time::advance(Duration::from_secs(61)).await;
        guard.failed(None, ip("10.0.0.1"));
        assert!(guard.admit(&key("d"), ip("10.0.0.1")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_locked_device_still_gets_in_from_its_last_good_address() {
        let guard = LoginGuard::new(config());
        guard.succeeded(&key("d"), ip("192.168.1.7"));
        guard.failed(Some(&key("d")), ip("10.0.0.1"));
        guard.failed(Some(&key("d")), ip("10.0.0.2"));
        let (by, _) = guard.admit(&key("d"), ip("10.0.0.3")).unwrap_err();
        assert_eq!(by, LockedBy::Device);
        assert!(guard.admit(&key("d"), ip("192.168.1.7")).is_ok());
        assert!(
            guard.admit(&key("e"), ip("10.0.0.3")).is_ok(),
            "other devices are not affected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_networks_count_as_one_client_and_mapped_v4_as_v4() {
        let guard = LoginGuard::new(config());
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::3"] {
            guard.failed(None, ip(host));
        }
        assert!(guard.admit(&key("d"), ip("2001:db8::ffff")).is_err());
        assert!(guard.admit(&key("d"), ip("2001:db8:0:1::1")).is_ok());
        for _ in 0..3 {
            guard.failed(None, ip("::ffff:10.1.1.1"));
        }
        assert!(guard.admit(&key("d"), ip("10.1.1.1")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn limits_of_zero_turn_a_side_off() {
        let guard = LoginGuard::new(GuardConfig {
            address_failures: 0,
            device_failures: 0,
            ..config()
        });
        for _ in 0..100 {
            guard.failed(Some(&key("d")), ip("10.0.0.1"));
        }
        assert!(guard.admit(&key("d"), ip("10.0.0.1")).is_ok());
    }
}
