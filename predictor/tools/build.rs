//! With the `torch` feature, lets binaries find libtorch at run time without
//! LD_LIBRARY_PATH (torch-sys links it but adds no rpath).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        if let Some(lib) = std::env::var_os("LIBTORCH") {
            let lib = std::path::Path::new(&lib).join("lib");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        }
    }
}
