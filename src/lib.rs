pub mod config;
pub mod diagnostic;
