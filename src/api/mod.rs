//! The SQL surface (schema `chunkwise`): task definition, planning (by query, key range
//! block range or Citus shard), running.

pub mod chunks;
pub mod cycles;
pub mod metrics;
pub mod operating;
pub mod planning;
pub mod running;
pub mod shards;
pub mod tasks;
