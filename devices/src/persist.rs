//! Snapshots of device state: one shape for every device. A device is rebuilt from the VM's
//! configuration (its files, TAP, sockets), then takes back what it had in the snapshot.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a device refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the saved state does not decode: {0}")]
    Decode(String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
    #[error("the saved state does not fit this device: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Restore(String),
}

/// A device's state across a snapshot.
pub trait Persist {
    /// Everything the device needs to go on as if nothing happened, beyond its configuration.
    type State: Serialize + DeserializeOwned;

    /// The state to save; the VM is paused. Saving may change the device where snapshot
    /// semantics say so (vsock resets its connections, as Firecracker does).
    fn save(&mut self) -> Self::State;

    /// Takes back `state` into this device, freshly built from the same configuration.
    fn restore(&mut self, state: Self::State) -> Result<(), PersistError>;
}

/// [`Persist`] with the state as bytes, for lists of devices of every kind.
pub trait Snapshottable: Send {
    fn save_bytes(&mut self) -> Result<Vec<u8>, PersistError>;
    fn restore_bytes(&mut self, bytes: &[u8]) -> Result<(), PersistError>;
}

impl<T: Persist + Send> Snapshottable for T {
    fn save_bytes(&mut self) -> Result<Vec<u8>, PersistError> {
        encode(&self.save())
    }

    fn restore_bytes(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        self.restore(decode(bytes)?)
    }
}

pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, PersistError> {
    postcard::to_stdvec(state).map_err(|e| PersistError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PersistError> {
    postcard::from_bytes(bytes).map_err(|e| PersistError::Decode(e.to_string()))
}
