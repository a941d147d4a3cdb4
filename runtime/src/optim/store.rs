//! Where the master weights live while the optimiser updates them.

use std::collections::BTreeMap;

use crate::tensor::HostTensor;
use crate::weights::Weights;

/// Named master weights that [`super::AdamW::step`] reads and updates in place. Implemented for
/// [`Weights`] and for `BTreeMap<String, HostTensor>`.
pub trait ParamStore {
    fn param(&self, name: &str) -> Option<&HostTensor>;
    /// Runs `f` on the named tensor; `None` when there is none.
    fn update_param<R>(&mut self, name: &str, f: impl FnOnce(&mut HostTensor) -> R) -> Option<R>;
}

impl ParamStore for BTreeMap<String, HostTensor> {
    fn param(&self, name: &str) -> Option<&HostTensor> {
        self.get(name)
    }
    fn update_param<R>(&mut self, name: &str, f: impl FnOnce(&mut HostTensor) -> R) -> Option<R> {
        self.get_mut(name).map(f)
    }
}

impl ParamStore for Weights {
    fn param(&self, name: &str) -> Option<&HostTensor> {
        self.get(name)
    }
    /// `Weights` lends no `&mut`, so the tensor is moved out and back (no data is copied).
    fn update_param<R>(&mut self, name: &str, f: impl FnOnce(&mut HostTensor) -> R) -> Option<R> {
        let mut tensor = self.remove(name)?;
        let result = f(&mut tensor);
        self.insert(name, tensor);
        Some(result)
    }
}
