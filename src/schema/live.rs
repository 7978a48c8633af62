//! The registry in force, swapped whole when the schemas folder changes: a reader takes one
//! `Arc` and sees one registry from start to end, never a mix of old and new.

use std::sync::{Arc, RwLock};

use super::files::Schemas;
use super::registry::Registry;

/// The schema files and their compiled registry, as one snapshot.
pub struct Snapshot {
    pub schemas: Schemas,
    pub registry: Registry,
}

pub struct Live {
    current: RwLock<Arc<Snapshot>>,
}

impl Live {
    pub fn new(schemas: Schemas, registry: Registry) -> Live {
        Live {
            current: RwLock::new(Arc::new(Snapshot { schemas, registry })),
        }
    }

    /// An empty registry: every message is unplanned.
    pub fn empty() -> Live {
        Live::new(Schemas::default(), Registry::default())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap().clone()
    }

    pub fn replace(&self, schemas: Schemas, registry: Registry) {
        *self.current.write().unwrap() = Arc::new(Snapshot { schemas, registry });
    }
}
