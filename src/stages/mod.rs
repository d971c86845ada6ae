//! The two consuming stages of the pipeline. Each reads from its own checkpoint, so it can be
//! stopped at any point and resumes exactly.

pub mod kafka;
pub mod normalizer;
pub mod projector;

/// Back-off after an error, so a broken store is not hammered (and logs stay readable).
pub(crate) const RETRY: std::time::Duration = std::time::Duration::from_millis(500);
