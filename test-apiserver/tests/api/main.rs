//! End-to-end tests: the server on a real socket, driven by kube-rs and by raw HTTP.

mod admin;
mod autoscalers;
mod bodies;
mod controller;
mod events;
mod faults;
mod kube_client;
mod rbac;
mod requests;
mod support;
mod watch;
