//! Shared code of roam's fuzz targets (see `README.md` in this directory).
#![forbid(unsafe_code)]

pub mod checks;
pub mod secure_checks;
pub mod session_driver;
