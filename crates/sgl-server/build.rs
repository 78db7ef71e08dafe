//! Links the binary to the libpython PyO3 found (`PYO3_PYTHON`, else `python3` on PATH) with an
//! rpath to its folder, so the binary runs without `LD_LIBRARY_PATH`, and records that Python's
//! version so the binary can refuse an environment of another version before starting Python.

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    let version = pyo3_build_config::get().version();
    println!("cargo:rustc-env=SGL_LINKED_PYTHON_VERSION={}.{}", version.major, version.minor);
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-env-changed=PYO3_CONFIG_FILE");
}
