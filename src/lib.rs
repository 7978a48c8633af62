pub mod config;
pub mod diagnostic;
pub mod intake_log;
pub mod metrics;
