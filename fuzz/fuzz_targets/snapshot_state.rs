//! The snapshot state file: framing, version, checksum and the state itself, as `PUT
//! /snapshot/load` reads it before anything is built. Whatever the bytes, the parser answers
//! with a state or an error that names the fault; it never panics or allocates without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{file, SnapshotState};

fuzz_target!(|data: &[u8]| {
    match file::decode::<SnapshotState>(data) {
        Ok(state) => {
            // A state that decodes goes on to the next checks a load makes.
            let _ = state.config(std::path::Path::new("fuzz.state"));
            let _ = state.host_cpu.runs_on(&state.host_cpu);
            for d in &state.devices {
                let _ = devices::persist::decode::<devices::virtio::mmio::TransportState>(&d.state);
            }
            let again = file::encode(&state).expect("a decoded state encodes");
            file::decode::<SnapshotState>(&again).expect("and decodes again");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
