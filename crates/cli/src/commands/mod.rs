pub mod image;
pub mod route;
pub mod vm;
