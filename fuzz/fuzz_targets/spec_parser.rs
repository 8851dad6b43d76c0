//! The JSON VM spec: parsing, validation, and the error that points at the bad line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::vmm_config::{SpecFileError, VmConfig};

fuzz_target!(|data: &[u8]| {
    // Spec files are read as UTF-8 text; anything else is refused before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.json");
    match VmConfig::parse(text) {
        Ok(config) => {
            if let Err(e) = config
                .validate()
                .and_then(|()| config.boot_source().map(|_| ()))
            {
                let _ = SpecFileError::at(path, text, e).to_string();
            }
        }
        Err((json_path, e)) => {
            let _ = format!("{json_path}: {e}");
        }
    }
});
