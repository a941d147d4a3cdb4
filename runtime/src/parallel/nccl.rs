//! [`Comm`] for ranks on GPUs: the collectives' payloads travel over NCCL (through cudarc,
//! loaded at run time, so this builds and links without a GPU or `libnccl`), everything else
//! over the same TCP group the CPU processes use.
//!
//! - The group forms through [`TcpComm`] (the `torchrun`-style rendezvous); rank 0 creates the
//!   NCCL unique id and sends it to every rank over that link.
//! - Point-to-point messages (the pipeline's activations and gradients) stay on the TCP link:
//!   [`Comm::send`] must not wait for the receiver and [`Comm::recv`] takes messages by tag in
//!   any order, while NCCL matches sends to receives in the order both sides post them and a
//!   send on a stream holds back everything behind it until the peer receives.
//! - All-reduce, all-to-all and barrier stage their f32 values in device buffers and move them
//!   with grouped NCCL sends and receives. Every member first announces its sizes over the TCP
//!   link (tag-matched, with the receive timeout), so a stopped or stalled peer is an error
//!   naming it rather than a kernel waiting forever, and the receivers know how much arrives.
//!   The all-reduce sums on the first member in group order, as the trait's default does, so
//!   every member gets the same bits as over TCP.
//!
//! Members of a group call the collectives in the same order (the pipeline's gradient
//! all-reduce goes through the parameters in name order, the expert exchanges in program order):
//! NCCL pairs a member's operations with a peer's in the order they are posted.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm as NcclGroup, Id, group_end, group_start};

use crate::cuda::device::GpuDevice;
use crate::tensor::{Data, HostTensor};

use super::comm::{Comm, CommError, Tag, check_parts};
use super::tcp::{Rendezvous, TcpComm};

/// A rank of a group whose collectives run over NCCL on GPU `device`.
pub struct NcclComm {
    /// The rendezvous link: point-to-point messages, and the sizes announced before each
    /// collective.
    control: TcpComm,
    nccl: Communicator,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.control.rank())
            .field("world", &self.control.world())
            .finish_non_exhaustive()
    }
}

/// cudarc's communicator, which holds a raw pointer and so is not `Send`.
struct Communicator(NcclGroup);

// SAFETY: an NCCL communicator may be used from any thread, one at a time (NCCL's thread-safety
// rule); `NcclComm` is used through `&mut`, so never from two threads at once.
unsafe impl Send for Communicator {}

/// Whether `libnccl.so` can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: this only `dlopen`s the library (running its initialisers) and keeps it.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

impl NcclComm {
    /// Joins the group at `rendezvous` on GPU `device` (the launcher's `LOCAL_RANK`, usually),
    /// waiting up to `timeout` for the others, as [`TcpComm::connect`]. Without a CUDA driver,
    /// the device or `libnccl`, a one-line error says which is missing (before any connection
    /// is made).
    pub fn connect(
        rendezvous: &Rendezvous,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclComm, CommError> {
        let rank = rendezvous.rank;
        let fail = |what: String| CommError::Mismatch {
            rank,
            what: format!("NCCL: {what}"),
        };
        let gpu = GpuDevice::probe(device).map_err(|e| fail(e.to_string()))?;
        if !nccl_present() {
            return Err(fail(
                "libnccl.so.2 is not loadable (install NCCL or add it to LD_LIBRARY_PATH)".into(),
            ));
        }
        let mut control = TcpComm::connect(rendezvous, timeout)?;
        let tag = Tag::Collective {
            key: "nccl.unique_id".into(),
            round: 0,
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("cannot create the unique id: {e:?}")))?;
            let words: Vec<i64> = id.internal().iter().map(|&c| i64::from(c)).collect();
            for peer in 1..control.world() {
                let tensor = HostTensor::i64([words.len()], words.clone());
                control.send(peer, tag.clone(), tensor)?;
            }
            id
        } else {
            let tensor = control.recv(0, &tag)?;
            let words = tensor.as_i64().unwrap_or_default();
            let mut internal = [0 as std::ffi::c_char; 128];
            if words.len() != internal.len() {
                return Err(fail(format!("a unique id of {} bytes", words.len())));
            }
            for (c, &w) in internal.iter_mut().zip(words) {
                // The id's bytes, sent as the chars they are.
                *c = w as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let stream = gpu.ctx.default_stream();
        let nccl = NcclGroup::from_rank(stream.clone(), rank, control.world(), id)
            .map(Communicator)
            .map_err(|e| fail(format!("cannot join the communicator: {e:?}")))?;
        Ok(NcclComm {
            control,
            nccl,
            stream,
        })
    }

    fn nccl_error(&self, what: impl std::fmt::Debug) -> CommError {
        CommError::Mismatch {
            rank: self.control.rank(),
            what: format!("NCCL: {what:?}"),
        }
    }

    /// Sends every `outgoing[i]` to `peers[i]` and receives `incoming[j]` f32 values from
    /// `sources[j]`, all in one NCCL group (so that no send waits behind a receive).
    fn exchange(
        &mut self,
        outgoing: &[(usize, &[f32])],
        incoming: &[(usize, usize)],
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let stream = self.stream.clone();
        let staged: Vec<CudaSlice<f32>> = outgoing
            .iter()
            .map(|(_, values)| stream.clone_htod(*values))
            .collect::<Result<_, _>>()
            .map_err(|e| self.nccl_error(e))?;
        let mut buffers: Vec<CudaSlice<f32>> = incoming
            .iter()
            .map(|&(_, len)| stream.alloc_zeros::<f32>(len.max(1)))
            .collect::<Result<_, _>>()
            .map_err(|e| self.nccl_error(e))?;
        // One group: NCCL starts the sends and receives together, so that none waits behind
        // another. The group is closed whatever happens inside it.
        group_start().map_err(|e| self.nccl_error(e))?;
        let mut posted = Ok(());
        for ((peer, values), buffer) in outgoing.iter().zip(&staged) {
            if posted.is_ok() && !values.is_empty() {
                posted = self.nccl.0.send(buffer, *peer as i32);
            }
        }
        for (&(source, len), buffer) in incoming.iter().zip(&mut buffers) {
            if posted.is_ok() && len > 0 {
                posted = self.nccl.0.recv(buffer, source as i32).map(drop);
            }
        }
        let ended = group_end();
        posted.map_err(|e| self.nccl_error(e))?;
        ended.map_err(|e| self.nccl_error(e))?;
        stream.synchronize().map_err(|e| self.nccl_error(e))?;
        incoming
            .iter()
            .zip(&buffers)
            .map(|(&(_, len), buffer)| {
                let mut values = stream.clone_dtoh(buffer).map_err(|e| self.nccl_error(e))?;
                values.truncate(len);
                Ok(values)
            })
            .collect()
    }

    /// Announces the shape of what goes to each of `peers` over the TCP link and returns the
    /// shape each of `sources` announced (waiting at most the receive timeout for each).
    fn announce(
        &mut self,
        key: &str,
        peers: &[(usize, &[usize])],
        sources: &[usize],
    ) -> Result<Vec<Vec<usize>>, CommError> {
        // The collective's own key: members of a group take part in other collectives too, in
        // other numbers, so only the key (and the order of its calls) pairs the announcements.
        let tag = Tag::Collective {
            key: format!("nccl.sizes.{key}"),
            round: 0,
        };
        for &(peer, dims) in peers {
            let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            self.control
                .send(peer, tag.clone(), HostTensor::i64([dims.len()], dims))?;
        }
        sources
            .iter()
            .map(|&source| {
                let tensor = self.control.recv(source, &tag)?;
                let dims = tensor.as_i64().unwrap_or_default();
                dims.iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<Result<Vec<usize>, _>>()
                    .map_err(|_| CommError::Mismatch {
                        rank: self.control.rank(),
                        what: format!("`{key}`: rank {source} announced the shape {dims:?}"),
                    })
            })
            .collect()
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world(&self) -> usize {
        self.control.world()
    }

    fn send(&mut self, peer: usize, tag: Tag, tensor: HostTensor) -> Result<(), CommError> {
        self.control.send(peer, tag, tensor)
    }

    fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError> {
        self.control.recv(peer, tag)
    }

    /// The sum in group order on the first member, as the trait's default, with the values
    /// moved by NCCL.
    fn all_reduce_sum(
        &mut self,
        group: &[usize],
        key: &str,
        values: &mut [f32],
    ) -> Result<(), CommError> {
        let me = self.rank();
        let (Some(&root), true) = (group.first(), group.len() > 1) else {
            return Ok(());
        };
        if !group.contains(&me) {
            return Err(CommError::Mismatch {
                rank: me,
                what: format!("all-reduce `{key}` in a group {group:?} without this rank"),
            });
        }
        let others = &group[1..];
        let mismatch = |rank: usize, got: usize| CommError::Mismatch {
            rank: me,
            what: format!(
                "all-reduce `{key}`: rank {rank} has {got} values, this rank {}",
                values.len()
            ),
        };
        let len = [values.len()];
        if me == root {
            let shapes = self.announce(key, &[], others)?;
            if let Some((&rank, shape)) = others.iter().zip(&shapes).find(|(_, s)| **s != len) {
                return Err(mismatch(rank, shape.iter().product()));
            }
            let incoming: Vec<(usize, usize)> = others.iter().map(|&r| (r, values.len())).collect();
            let parts = self.exchange(&[], &incoming)?;
            for part in &parts {
                for (v, x) in values.iter_mut().zip(part) {
                    *v += x;
                }
            }
            let outgoing: Vec<(usize, &[f32])> = others.iter().map(|&r| (r, &*values)).collect();
            self.exchange(&outgoing, &[])?;
        } else {
            self.announce(key, &[(root, &len)], &[])?;
            self.exchange(&[(root, &*values)], &[])?;
            let sum = self.exchange(&[], &[(root, values.len())])?;
            values.copy_from_slice(&sum[0]);
        }
        Ok(())
    }

    /// Sizes over the TCP link, then every part in one NCCL group. Parts that are not f32 go
    /// over the TCP link, as with [`TcpComm`].
    fn all_to_all_in(
        &mut self,
        group: &[usize],
        key: &str,
        parts: Vec<HostTensor>,
    ) -> Result<Vec<HostTensor>, CommError> {
        let me = self.rank();
        check_parts(me, group, key, parts.len())?;
        if parts.iter().any(|p| !matches!(p.data, Data::Float(_))) {
            return self.control.all_to_all_in(group, key, parts);
        }
        let peers: Vec<(usize, &[usize])> = group
            .iter()
            .zip(&parts)
            .filter(|(r, _)| **r != me)
            .map(|(&r, p)| (r, p.dims()))
            .collect();
        let sources: Vec<usize> = group.iter().copied().filter(|&r| r != me).collect();
        let shapes = self.announce(key, &peers, &sources)?;
        let outgoing: Vec<(usize, &[f32])> = group
            .iter()
            .zip(&parts)
            .filter(|(r, _)| **r != me)
            .map(|(&r, p)| (r, p.as_f32().unwrap_or_default()))
            .collect();
        let incoming: Vec<(usize, usize)> = sources
            .iter()
            .zip(&shapes)
            .map(|(&r, dims)| (r, dims.iter().product()))
            .collect();
        let mut received = self.exchange(&outgoing, &incoming)?.into_iter();
        let mut shapes = shapes.into_iter();
        let mut parts = parts.into_iter();
        group
            .iter()
            .map(|&r| {
                let own = parts.next().expect("one part per member");
                Ok(match r == me {
                    true => own,
                    false => {
                        let values = received.next().expect("one part per peer");
                        HostTensor::f32(shapes.next().expect("one shape per peer"), values)
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::parallel::comm::collective_suite;

    /// Without a driver, a device or `libnccl`, joining fails at once with one line naming what
    /// is missing, before any connection is tried (the master address here leads nowhere).
    #[test]
    fn without_a_gpu_or_nccl_joining_is_a_one_line_error() {
        if GpuDevice::probe(0).is_ok() && nccl_present() {
            eprintln!("a GPU and libnccl are present: the missing-library path is not exercised");
            return;
        }
        let rendezvous = Rendezvous {
            master: "nowhere.invalid:1".into(),
            rank: 0,
            world: 2,
        };
        let started = Instant::now();
        let err = NcclComm::connect(&rendezvous, 0, Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(err.starts_with("rank 0: NCCL: "), "{err}");
        assert!(
            err.contains("CUDA driver") || err.contains("device") || err.contains("libnccl"),
            "{err}"
        );
    }

    /// The collective suite the thread and TCP transports pass, over NCCL with one thread per
    /// GPU (NCCL takes one rank per device, so this needs two GPUs and `libnccl`; it says why
    /// it is skipped otherwise).
    #[test]
    fn collectives_over_nccl_give_what_the_other_transports_give() {
        let gpus = (0..2).filter(|&d| GpuDevice::probe(d).is_ok()).count();
        if gpus < 2 || !nccl_present() {
            eprintln!(
                "skipped: NCCL needs one GPU per rank ({gpus} usable here) and libnccl ({})",
                if nccl_present() { "present" } else { "absent" }
            );
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    s.spawn(move || {
                        let rendezvous = Rendezvous {
                            master: format!("127.0.0.1:{port}"),
                            rank,
                            world: 2,
                        };
                        let mut comm =
                            NcclComm::connect(&rendezvous, rank, Duration::from_secs(60)).unwrap();
                        collective_suite(&mut comm);
                    })
                })
                .collect();
            for handle in handles {
                handle.join().unwrap();
            }
        });
    }
}
