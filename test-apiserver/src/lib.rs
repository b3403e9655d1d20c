//! A faithful stand-in for a Kubernetes apiserver, for tests and the local demo stack: apps/v1
//! Deployments and StatefulSets with their `/scale` subresource, lists and watches,
//! SelfSubjectAccessReview, HorizontalPodAutoscalers and KEDA ScaledObjects, Events, bearer-token auth and an RBAC table, a simulated controller, fault
//! injection and a request log. It answers with the real server's bodies and omissions.

mod admin;
mod autoscalers;
mod cluster;
mod controller;
mod faults;
mod http;
mod kubeconfig;
mod patch;
mod rbac;
mod request;
mod requests;
mod selector;
mod server;
mod status;
mod store;
mod watch;
mod workload;

pub use autoscalers::{AutoscalerKind, PAUSED_REPLICAS};
pub use cluster::Cluster;
pub use controller::ControllerMode;
pub use faults::Fault;
pub use http::app;
pub use kubeconfig::{CONTEXT, KUBECONFIG_USER, kubeconfig_yaml};
pub use rbac::RbacRule;
pub use requests::RecordedRequest;
pub use server::{DEFAULT_TOKEN, Options, TestApiServer};
pub use status::USER;
pub use workload::{UnknownKind, WorkloadKind, WorkloadSeed, WorkloadSeedError};
