//! The SQL surface (schema `chunkwise`): task definition, planning, running.

pub mod planning;
pub mod running;
pub mod tasks;
