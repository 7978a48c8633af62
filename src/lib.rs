pub mod clock;
pub mod config;
pub mod diagnostic;
pub mod entry;
pub mod ingest;
pub mod intake_log;
pub mod metrics;
