pub mod exec;
pub mod image;
pub mod key;
pub mod node;
pub mod route;
pub mod snapshot;
pub mod storage;
pub mod vm;
