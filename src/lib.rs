//! matrix-k8s-toggle: a Matrix application service that switches Kubernetes workloads on and
//! off from chat, with end-to-end encryption.
//!
//! Data flows one way: [`appservice`] → [`store`] → [`worker`] → [`bridge`] → [`matrix`].

pub mod appservice;
pub mod bridge;
pub mod calendar;
pub mod check;
pub mod clock;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod drift;
pub mod matrix;
pub mod metrics;
pub mod policy;
pub mod registration;
pub mod replies;
pub mod rooms;
pub mod scaler;
pub mod secret;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use appservice::app;
