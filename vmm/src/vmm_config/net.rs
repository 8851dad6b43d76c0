//! `network-interfaces[]`: virtio-net devices on host TAPs, Firecracker's fields.

use std::collections::HashSet;

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

use super::drives::{validate_id, validate_rate_limiter};
use super::{ConfigError, JsonPath, Segment};

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    /// `aa:bb:cc:dd:ee:ff`; without it the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Advertised to the guest (VIRTIO_NET_F_MTU); 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// `PATCH /network-interfaces/{id}`: the rate limiters, live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

fn field(index: usize, name: &'static str) -> JsonPath {
    JsonPath(vec![
        Segment::Key("network-interfaces"),
        Segment::Index(index),
        Segment::Key(name),
    ])
}

impl NetworkInterfaceConfig {
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        validate_id(field(index, "iface_id"), &self.iface_id)?;
        let name = &self.host_dev_name;
        if name.is_empty() || name.len() > 15 || name.contains(['/', '\0', ' ']) {
            return Err(ConfigError::new(
                field(index, "host_dev_name"),
                format!("{name:?} is not a valid interface name (1 to 15 bytes, no '/' or spaces)"),
            ));
        }
        if let Some(mac) = &self.guest_mac {
            if parse_mac(mac).is_none() {
                return Err(ConfigError::new(
                    field(index, "guest_mac"),
                    format!("{mac:?} is not a MAC address like 06:00:ac:10:00:02"),
                ));
            }
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(ConfigError::new(
                    field(index, "mtu"),
                    format!("must be between 68 and 65535, got {mtu}"),
                ));
            }
        }
        validate_rate_limiter(field(index, "rx_rate_limiter"), &self.rx_rate_limiter)?;
        validate_rate_limiter(field(index, "tx_rate_limiter"), &self.tx_rate_limiter)
    }
}

/// Checks every interface and that ids and TAPs are not shared.
pub fn validate_interfaces(ifaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
    let (mut ids, mut taps) = (HashSet::new(), HashSet::new());
    for (i, n) in ifaces.iter().enumerate() {
        n.validate(i)?;
        if !ids.insert(n.iface_id.as_str()) {
            return Err(ConfigError::new(
                field(i, "iface_id"),
                format!("interface id {:?} is used twice", n.iface_id),
            ));
        }
        if !taps.insert(n.host_dev_name.as_str()) {
            return Err(ConfigError::new(
                field(i, "host_dev_name"),
                format!("TAP {:?} is used by two interfaces", n.host_dev_name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
        NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(str::to_string),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
        }
    }

    #[test]
    fn interfaces_are_checked_field_by_field() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:zz"), None);
        assert!(validate_interfaces(&[iface("eth0", "tap0", Some("06:00:ac:10:00:02"))]).is_ok());
        let e = validate_interfaces(&[iface("eth0", "tap0", Some("nope"))]).unwrap_err();
        assert_eq!(e.path.to_string(), "network-interfaces[0].guest_mac");
        let e = validate_interfaces(&[iface("eth0", "a-very-long-tap-name", None)]).unwrap_err();
        assert_eq!(e.path.to_string(), "network-interfaces[0].host_dev_name");
        let e = validate_interfaces(&[iface("a", "t", None), iface("b", "t", None)]).unwrap_err();
        assert!(e.message.contains("used by two"));
    }
}
