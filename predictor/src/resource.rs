//! The resources the policy allocates and a fixed-size map keyed by them.

use serde::{Deserialize, Serialize};
use std::ops::{Index, IndexMut};

/// A resource the policy sizes. Units are fixed so traces from different runs compare:
/// CPU in cores (CPU-seconds per second), memory in MiB, block and network in MiB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Cpu,
    Mem,
    Blk,
    Net,
}

impl Resource {
    pub const ALL: [Resource; 4] = [Resource::Cpu, Resource::Mem, Resource::Blk, Resource::Net];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Mem => "mem",
            Resource::Blk => "blk",
            Resource::Net => "net",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "cores",
            Resource::Mem => "MiB",
            Resource::Blk | Resource::Net => "MiB/s",
        }
    }
}

/// One value per resource. A struct with named fields rather than an array so that the
/// JSON of traces and decisions reads `{"cpu":..,"mem":..}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PerResource<T> {
    pub cpu: T,
    pub mem: T,
    pub blk: T,
    pub net: T,
}

impl<T> PerResource<T> {
    pub fn from_fn(mut f: impl FnMut(Resource) -> T) -> Self {
        PerResource {
            cpu: f(Resource::Cpu),
            mem: f(Resource::Mem),
            blk: f(Resource::Blk),
            net: f(Resource::Net),
        }
    }

    pub fn map<U>(&self, mut f: impl FnMut(Resource, &T) -> U) -> PerResource<U> {
        PerResource::from_fn(|r| f(r, &self[r]))
    }

    pub fn iter(&self) -> impl Iterator<Item = (Resource, &T)> {
        Resource::ALL.into_iter().map(move |r| (r, &self[r]))
    }
}

impl<T> Index<Resource> for PerResource<T> {
    type Output = T;
    fn index(&self, r: Resource) -> &T {
        match r {
            Resource::Cpu => &self.cpu,
            Resource::Mem => &self.mem,
            Resource::Blk => &self.blk,
            Resource::Net => &self.net,
        }
    }
}

impl<T> IndexMut<Resource> for PerResource<T> {
    fn index_mut(&mut self, r: Resource) -> &mut T {
        match r {
            Resource::Cpu => &mut self.cpu,
            Resource::Mem => &mut self.mem,
            Resource::Blk => &mut self.blk,
            Resource::Net => &mut self.net,
        }
    }
}

/// Measured use of each resource over one window.
pub type Usage = PerResource<f64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_named_fields() {
        let mut p = PerResource::from_fn(|r| r as usize);
        assert_eq!((p.cpu, p.mem, p.blk, p.net), (0, 1, 2, 3));
        p[Resource::Blk] = 9;
        assert_eq!(p.blk, 9);
        let doubled = p.map(|_, v| v * 2);
        assert_eq!(doubled[Resource::Blk], 18);
        assert_eq!(p.iter().map(|(_, v)| *v).sum::<usize>(), 13);
    }

    #[test]
    fn serialises_with_resource_names() {
        let p = PerResource {
            cpu: 1.5,
            mem: 2.0,
            blk: 0.0,
            net: 3.0,
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"cpu":1.5,"mem":2.0,"blk":0.0,"net":3.0}"#);
    }
}
