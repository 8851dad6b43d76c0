//! The snapshot state file: framing, version, checksum and the state itself, as `PUT
//! /snapshot/load` reads it before anything is built. Whatever the bytes, the parser answers
//! with a state or an error that names the fault; it never panics or allocates without bound.
//! A predictor state that is taken back must then run: its policy decides a few windows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::autopilot::Autopilot;
use vmm::profile::store::WarmStart;
use vmm::snapshot::{file, SnapshotState};

fuzz_target!(|data: &[u8]| {
    match file::decode::<SnapshotState>(data) {
        Ok(state) => {
            // A state that decodes goes on to the next checks a load makes.
            let config = state.config(std::path::Path::new("fuzz.state"));
            let _ = state.host_cpu.runs_on(&state.host_cpu);
            for d in &state.devices {
                let _ = devices::persist::decode::<devices::virtio::mmio::TransportState>(&d.state);
            }
            if let (Ok(config), Some(saved)) = (&config, &state.predictor) {
                let mut predictor = config.predictor.clone().unwrap_or_default();
                // Never a file the input names.
                predictor.trace_path = None;
                let machine = &config.machine_config;
                if let Ok(mut autopilot) = Autopilot::new(&predictor, machine, "fuzz", 0) {
                    if autopilot.restore_state(saved, machine, 0).is_ok() {
                        autopilot.warm_start(&WarmStart {
                            source: "fuzz".into(),
                            samples: vec![Default::default(); 3],
                        });
                        let _ = autopilot.status();
                    }
                }
            }
            let again = file::encode(&state).expect("a decoded state encodes");
            file::decode::<SnapshotState>(&again).expect("and decodes again");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
