//! Integration tests: one binary (the build is large; one link instead of one per file).

mod audiences;
mod cli;
mod destinations;
mod durability;
mod hardening;
mod http_api;
mod lake;
mod layering;
mod plan;
mod receiver;
mod schemas;
mod support;
