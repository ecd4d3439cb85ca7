pub mod image;
pub mod route;
pub mod snapshot;
pub mod vm;
