//! Prints where the build put the test guest, for scripts and benchmarks outside cargo's tests:
//! `test-guest` (the PVH image) or `test-guest linux64` (the image without the PVH note).

use std::process::ExitCode;

fn main() -> ExitCode {
    let which = std::env::args().nth(1);
    match which.as_deref() {
        None | Some("pvh") => println!("{}", integration_tests::TEST_GUEST_PVH),
        Some("linux64") => println!("{}", integration_tests::TEST_GUEST_LINUX64),
        Some(other) => {
            eprintln!("test-guest: unknown variant {other:?}; use pvh or linux64");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
