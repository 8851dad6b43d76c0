//! `mmds-config`: the metadata service (Firecracker's fields): which interfaces serve it, at
//! which address, in which version.

use std::net::Ipv4Addr;

use mmds::MmdsVersion;
use serde::{Deserialize, Serialize};

use super::net::NetworkInterfaceConfig;
use super::{ConfigError, JsonPath};

/// The section (and `PUT /mmds/config` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces whose guest traffic to `ipv4_address` the VMM answers itself.
    pub network_interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Plain-text answers whatever the guest's Accept header says (EC2 IMDS's behaviour).
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    fn field(name: &'static str) -> JsonPath {
        JsonPath::keys(&["mmds-config", name])
    }

    /// The service's address.
    pub fn address(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(mmds::DEFAULT_IPV4)
    }

    /// Checks the section against the VM's interfaces, with Firecracker's rules and texts.
    pub fn validate(&self, interfaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::new(
                Self::field("network_interfaces"),
                "The list of network interface IDs that allow forwarding MMDS requests is empty.",
            ));
        }
        if let Some(missing) = self
            .network_interfaces
            .iter()
            .find(|id| !interfaces.iter().any(|n| &&n.iface_id == id))
        {
            return Err(ConfigError::new(
                Self::field("network_interfaces"),
                format!(
                    "The list of network interface IDs provided contains at least one ID that \
                     does not correspond to any existing network interface ({missing:?})."
                ),
            ));
        }
        // 169.254.1.0 to 169.254.254.255: link-local, outside the reserved first and last /24.
        let [a, b, c, _] = self.address().octets();
        if a != 169 || b != 254 || !(1..=254).contains(&c) {
            return Err(ConfigError::new(
                Self::field("ipv4_address"),
                format!(
                    "The MMDS IPv4 address is not link local ({}): it must be in 169.254.1.0 to 169.254.254.255.",
                    self.address()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(id: &str) -> NetworkInterfaceConfig {
        serde_json::from_value(serde_json::json!({"iface_id": id, "host_dev_name": "tap0"}))
            .unwrap()
    }

    #[test]
    fn interfaces_and_address_are_checked() {
        let parse = |v: serde_json::Value| serde_json::from_value::<MmdsConfig>(v).unwrap();
        let ok = parse(serde_json::json!({"network_interfaces": ["eth0"], "version": "V2"}));
        assert_eq!(ok.version, MmdsVersion::V2);
        assert_eq!(ok.address(), Ipv4Addr::new(169, 254, 169, 254));
        ok.validate(&[iface("eth0")]).unwrap();
        let e = ok.validate(&[iface("eth1")]).unwrap_err();
        assert!(e.message.contains("does not correspond"), "{e}");
        let e = parse(serde_json::json!({"network_interfaces": []}))
            .validate(&[])
            .unwrap_err();
        assert!(e.message.contains("is empty"), "{e}");
        for bad in ["169.254.0.1", "169.254.255.1", "10.0.0.1"] {
            let e = parse(serde_json::json!({"network_interfaces": ["eth0"], "ipv4_address": bad}))
                .validate(&[iface("eth0")])
                .unwrap_err();
            assert_eq!(e.path.to_string(), "mmds-config.ipv4_address", "{bad}");
        }
        parse(serde_json::json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2", "imds_compat": true}))
            .validate(&[iface("eth0")])
            .unwrap();
        assert!(serde_json::from_value::<MmdsConfig>(
            serde_json::json!({"network_interfaces": ["a"], "version": "V3"})
        )
        .is_err());
        assert!(serde_json::from_value::<MmdsConfig>(
            serde_json::json!({"network_interfaces": ["a"], "ipv4_address": "300.1.1.1"})
        )
        .is_err());
        assert!(serde_json::from_value::<MmdsConfig>(
            serde_json::json!({"network_interfaces": ["a"], "port": 80})
        )
        .is_err());
    }
}
