//! The predictor's state across a VM snapshot: a restored VM's policy goes on with the
//! forecasters, bands, budget and scores it had instead of learning again from cold.
//!
//! Every forecaster takes part through one object-safe shape, [`SavedState`] (its whole state
//! as bytes). A forecaster that is plain data gets it by deriving serde and implementing
//! [`Persist`], whose one optional method says whether a decoded state may replace the
//! forecaster the restored VM built from the same configuration. A forecaster made of other
//! forecasters (an ensemble) implements [`SavedState`] itself, nesting theirs.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum PersistError {
    #[error("cannot encode the predictor's state: {0}")]
    Encode(String),
    #[error("the saved predictor state does not decode: {0}")]
    Decode(String),
    #[error("the saved predictor state does not fit this VM's predictor: {0}")]
    Mismatch(String),
}

/// Plain-data predictor state, saved and restored whole.
pub trait Persist: Serialize + DeserializeOwned {
    /// Whether `self`, decoded from a snapshot, may replace `fresh`, built from the same
    /// configuration: sizes that index one another agree, so the restored value cannot index
    /// out of bounds. Anything without such sizes fits.
    fn fits(&self, fresh: &Self) -> Result<(), String> {
        let _ = fresh;
        Ok(())
    }
}

/// A forecaster's whole state as bytes, for lists of forecasters of every kind.
pub trait SavedState {
    fn save_state(&self) -> Result<Vec<u8>, PersistError>;
    /// Takes back what [`SavedState::save_state`] gave, into a forecaster built from the same
    /// configuration; on error `self` is unchanged.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError>;
}

impl<T: Persist> SavedState for T {
    fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        encode(self)
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let saved: T = decode(bytes)?;
        saved.fits(self).map_err(PersistError::Mismatch)?;
        *self = saved;
        Ok(())
    }
}

pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, PersistError> {
    postcard::to_stdvec(state).map_err(|e| PersistError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PersistError> {
    postcard::from_bytes(bytes).map_err(|e| PersistError::Decode(e.to_string()))
}

/// `#[serde(with = "crate::persist::array")]` for `[f64; N]` of any length (serde's own impls
/// stop at 32).
pub mod array {
    use super::*;

    pub fn serialize<S: Serializer, const N: usize>(a: &[f64; N], s: S) -> Result<S::Ok, S::Error> {
        a.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[f64; N], D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        let len = v.len();
        v.try_into()
            .map_err(|_| serde::de::Error::invalid_length(len, &format!("{N} values").as_str()))
    }
}

/// One forecaster's state in a list of forecasters (a policy's, an ensemble's), under its name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedForecaster {
    pub name: String,
    pub state: Vec<u8>,
}

impl SavedForecaster {
    pub fn save(name: &str, forecaster: &dyn SavedState) -> Result<Self, PersistError> {
        Ok(SavedForecaster {
            name: name.to_string(),
            state: forecaster.save_state()?,
        })
    }

    /// Restores into `forecaster`, named `name`, which must be the one saved.
    pub fn restore(&self, name: &str, forecaster: &mut dyn SavedState) -> Result<(), PersistError> {
        if self.name != name {
            return Err(PersistError::Mismatch(format!(
                "saved {:?}, this predictor builds {name:?}",
                self.name
            )));
        }
        forecaster.restore_state(&self.state)
    }
}

/// Checks one restored length against the fresh value's.
pub fn same_len(what: &str, saved: usize, fresh: usize) -> Result<(), String> {
    if saved == fresh {
        Ok(())
    } else {
        Err(format!("{what}: {saved} saved, {fresh} here"))
    }
}
