//! What `POST /vms` asks for: a VM's id, priority class and Firecracker config, checked in full
//! before anything is launched, and the range of each resource the pool may grant it.

use std::path::PathBuf;

use predictor::resource::{PerResource, Resource};
use serde::{Deserialize, Serialize};

use crate::vmm_config::{PredictorConfig, Range, VmConfig};

/// Errors of a VM request; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the request body is not a VM request: {0}")]
    Body(serde_json::Error),
    #[error("give one of config (the VM's Firecracker config), config_file or from_pool")]
    NoConfig,
    #[error("give only one of config, config_file and from_pool")]
    TwoConfigs,
    #[error("config_file {path}: {source}")]
    ConfigFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config.{path}: {message}")]
    ConfigSyntax { path: String, message: String },
    #[error("config: {0}")]
    Config(#[from] crate::vmm_config::ConfigError),
    #[error("id: {0}")]
    Id(String),
    #[error("jailer.{0}")]
    Jailer(String),
}

/// How a VM's wants are served when the pool is short (docs/pool.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Served first; the last to be squeezed.
    Guaranteed,
    #[default]
    Burstable,
    /// Served last; the first to be squeezed.
    BestEffort,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Guaranteed, Class::Burstable, Class::BestEffort];

    pub fn name(self) -> &'static str {
        match self {
            Class::Guaranteed => "guaranteed",
            Class::Burstable => "burstable",
            Class::BestEffort => "best-effort",
        }
    }
}

/// `POST /vms` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    /// Letters, digits and '-'; made up when absent.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub class: Class,
    /// The VM's Firecracker config (the `--config-file` format).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Or the path of one.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
    /// Or a warm VM of this class, resumed.
    #[serde(default)]
    pub from_pool: Option<String>,
    /// Launch the VMM through the jailer (`prescient jail`) with these settings.
    #[serde(default)]
    pub jailer: Option<JailerSpec>,
}

/// How a VM is jailed: Firecracker's jailer's flags that matter to a supervisor; the jailer
/// checks them (and the supervisor reports its refusal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailerSpec {
    pub uid: u32,
    pub gid: u32,
    /// The chroot is `<dir>/prescient/<id>/root` (absolute; the API socket's host path
    /// inside it must fit a socket address).
    #[serde(default = "default_chroot_base")]
    pub chroot_base_dir: PathBuf,
    /// 1 or 2.
    #[serde(default = "default_cgroup_version")]
    pub cgroup_version: u8,
}

fn default_chroot_base() -> PathBuf {
    PathBuf::from("/srv/jailer")
}

fn default_cgroup_version() -> u8 {
    1
}

/// Where a jailed VMM serves its API, inside its chroot.
pub const JAILED_API_SOCK: &str = "/run/api.sock";

impl JailerSpec {
    /// The API socket's path on the host.
    pub fn host_socket(&self, id: &str) -> PathBuf {
        self.chroot_base_dir
            .join("prescient")
            .join(id)
            .join("root")
            .join(JAILED_API_SOCK.trim_start_matches('/'))
    }
}

/// What the pool may grant a VM of one resource: never below `floor` (reserved from admission
/// on), never above `ceiling`, in multiples of `step` above the floor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Span {
    pub floor: f64,
    pub ceiling: f64,
    pub step: f64,
}

/// A checked request, ready to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    pub class: Class,
    pub config: VmConfig,
    pub spans: PerResource<Span>,
    pub jailer: Option<JailerSpec>,
}

impl VmRequest {
    pub fn parse(body: &[u8]) -> Result<Self, SpecError> {
        serde_json::from_slice(body).map_err(SpecError::Body)
    }

    /// The request's config, read and parsed; `None` for a warm VM.
    pub fn config(&self) -> Result<Option<VmConfig>, SpecError> {
        let text = match (&self.config, &self.config_file, &self.from_pool) {
            (None, None, None) => return Err(SpecError::NoConfig),
            (Some(c), None, None) => c.to_string(),
            (None, Some(path), None) => {
                std::fs::read_to_string(path).map_err(|source| SpecError::ConfigFile {
                    path: path.clone(),
                    source,
                })?
            }
            (None, None, Some(_)) => return Ok(None),
            _ => return Err(SpecError::TwoConfigs),
        };
        VmConfig::parse(&text)
            .map(Some)
            .map_err(|(path, e)| SpecError::ConfigSyntax {
                path,
                message: e.to_string(),
            })
    }
}

/// Checks `config` as the VMM would and works out what the pool may grant it; the predictor
/// section is added when the config has none (the pool steers VMs through it).
pub fn check(
    id: String,
    class: Class,
    mut config: VmConfig,
    jailer: Option<JailerSpec>,
) -> Result<LaunchSpec, SpecError> {
    crate::cli::validate_instance_id(&id).map_err(SpecError::Id)?;
    if let Some(j) = &jailer {
        if !j.chroot_base_dir.is_absolute() {
            return Err(SpecError::Jailer(format!(
                "chroot_base_dir {}: must be absolute",
                j.chroot_base_dir.display()
            )));
        }
        if !matches!(j.cgroup_version, 1 | 2) {
            return Err(SpecError::Jailer(format!(
                "cgroup_version {}: 1 or 2",
                j.cgroup_version
            )));
        }
        // A Unix socket address holds 107 bytes and a NUL.
        let sock = j.host_socket(&id);
        if sock.as_os_str().len() > 107 {
            return Err(SpecError::Jailer(format!(
                "chroot_base_dir: the API socket {} would be longer than a socket address \
                 (107 bytes)",
                sock.display()
            )));
        }
    }
    config.validate()?;
    config.boot_source()?;
    let predictor = config
        .predictor
        .get_or_insert_with(PredictorConfig::default);
    predictor.validate(&config.machine_config)?;
    let budget = predictor.budget(&config.machine_config);
    let machine = &config.machine_config;
    // Memory the VM cannot give back is held whatever it is granted: all of it without a
    // balloon or virtio-mem, its boot RAM without a balloon.
    let ram = machine.mem_size_mib as f64;
    let mem_floor = match (&config.balloon, &config.memory_hotplug) {
        (None, None) => budget.0.mem.max,
        (None, Some(_)) => budget.0.mem.min.max(ram),
        (Some(_), _) => budget.0.mem.min,
    };
    let spans = PerResource::from_fn(|r| {
        let l = budget.0[r];
        let floor = if r == Resource::Mem {
            mem_floor.min(l.max)
        } else {
            l.min
        };
        Span {
            floor,
            ceiling: l.max,
            step: l.step,
        }
    });
    Ok(LaunchSpec {
        id,
        class,
        config,
        spans,
        jailer,
    })
}

impl LaunchSpec {
    /// The config the VMM is launched with: the predictor's budget set to the grant.
    pub fn config_with_grant(&self, grant: &PerResource<f64>) -> VmConfig {
        let mut config = self.config.clone();
        if let Some(p) = config.predictor.as_mut() {
            p.budget = budget_update(&self.spans, grant, &self.spans.map(|_, s| s.floor));
        }
        config
    }
}

/// The predictor budget that holds a VM to `grant`: from `hold` (at least its floor) up to the
/// grant.
pub fn budget_update(
    spans: &PerResource<Span>,
    grant: &PerResource<f64>,
    hold: &PerResource<f64>,
) -> crate::vmm_config::BudgetConfig {
    let range = |r: Resource| {
        Some(Range {
            min: hold[r].max(spans[r].floor).min(grant[r]),
            max: grant[r],
        })
    };
    crate::vmm_config::BudgetConfig {
        memory_mib: range(Resource::Mem),
        cpu_cores: range(Resource::Cpu),
        blk_mibps: range(Resource::Blk),
        net_mibps: range(Resource::Net),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel file that exists, for the config's check; removed when dropped.
    struct Kernel(std::path::PathBuf);

    impl Drop for Kernel {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn kernel(name: &str) -> Kernel {
        let p = std::env::temp_dir().join(format!("host-spec-{name}-{}", std::process::id()));
        // The magic of a 64-bit ELF is all the config check reads.
        std::fs::write(&p, b"\x7fELF\x02").unwrap();
        Kernel(p)
    }

    fn request(json: serde_json::Value) -> Result<LaunchSpec, SpecError> {
        let r = VmRequest::parse(json.to_string().as_bytes())?;
        let config = r.config()?.expect("a config");
        check(
            r.id.unwrap_or_else(|| "vm".into()),
            r.class,
            config,
            r.jailer,
        )
    }

    #[test]
    fn spans_follow_the_devices_that_can_give_memory_back() {
        let k = kernel("spans");
        let base = serde_json::json!({
            "boot-source": {"kernel_image_path": k.0},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        });
        let s = request(serde_json::json!({"id": "a", "config": base})).unwrap();
        assert_eq!(s.class, Class::Burstable);
        // Nothing can take memory back: all of it is held.
        assert_eq!((s.spans.mem.floor, s.spans.mem.ceiling), (128.0, 128.0));
        let mut hot = base.clone();
        hot["memory-hotplug"] = serde_json::json!({"total_size_mib": 512});
        hot["predictor"] = serde_json::json!({"budget": {"memory_mib": {"min": 96, "max": 640}}});
        let s =
            request(serde_json::json!({"id": "b", "class": "guaranteed", "config": hot})).unwrap();
        assert_eq!(s.class, Class::Guaranteed);
        // virtio-mem alone: the boot RAM stays.
        assert_eq!((s.spans.mem.floor, s.spans.mem.ceiling), (128.0, 640.0));
        hot["balloon"] = serde_json::json!({"amount_mib": 0, "deflate_on_oom": true});
        let s =
            request(serde_json::json!({"id": "c", "class": "best-effort", "config": hot})).unwrap();
        assert_eq!((s.spans.mem.floor, s.spans.mem.ceiling), (96.0, 640.0));
        let grant = PerResource {
            cpu: 0.5,
            mem: 200.0,
            blk: 10.0,
            net: 10.0,
        };
        let b = s.config_with_grant(&grant).predictor.unwrap().budget;
        assert_eq!(
            b.memory_mib,
            Some(Range {
                min: 96.0,
                max: 200.0
            })
        );
        assert_eq!(
            b.cpu_cores,
            Some(Range {
                min: 0.05,
                max: 0.5
            })
        );
    }

    #[test]
    fn each_bad_request_says_what_is_wrong() {
        let k = kernel("errors");
        let err = |j: serde_json::Value| request(j).unwrap_err().to_string();
        assert!(err(serde_json::json!({"idd": "x"})).contains("unknown field `idd`"));
        assert!(err(serde_json::json!({"class": "vip"})).contains("unknown variant `vip`"));
        assert!(err(serde_json::json!({"id": "x"})).starts_with("give one of config"));
        assert!(
            err(serde_json::json!({"config": {}, "from_pool": "p"})).starts_with("give only one")
        );
        let e = err(serde_json::json!({"config": {"machine-config": {"vcpu_count": "two"}}}));
        assert!(e.starts_with("config.machine-config.vcpu_count:"), "{e}");
        let e = err(
            serde_json::json!({"config": {"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}}),
        );
        assert!(e.contains("boot-source"), "{e}");
        let e = err(serde_json::json!({"id": "a b", "config": {
            "boot-source": {"kernel_image_path": k.0},
        }}));
        assert!(e.starts_with("id: "), "{e}");
        let boot = serde_json::json!({"boot-source": {"kernel_image_path": k.0}});
        let e = err(
            serde_json::json!({"config": boot, "jailer": {"uid": 1, "gid": 1,
                                       "chroot_base_dir": "jail"}}),
        );
        assert!(
            e.starts_with("jailer.chroot_base_dir jail: must be absolute"),
            "{e}"
        );
        let e = err(
            serde_json::json!({"config": boot, "jailer": {"uid": 1, "gid": 1,
                                       "chroot_base_dir": format!("/{}", "d".repeat(90))}}),
        );
        assert!(e.contains("longer than a socket address"), "{e}");
        let e = err(serde_json::json!({"config": boot, "jailer": {"uid": 1}}));
        assert!(e.contains("missing field `gid`"), "{e}");
        let e = err(serde_json::json!({"config_file": "/nonexistent/vm.json"}));
        assert!(e.starts_with("config_file /nonexistent/vm.json:"), "{e}");
    }
}
