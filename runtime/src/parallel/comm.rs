//! Point-to-point and collective communication between ranks, behind one trait.
//!
//! [`Comm`] is what a rank's program sees: send and receive of tagged tensors, and the
//! collectives built on them (all-reduce, all-to-all, barrier). [`ThreadComm`] implements it
//! for ranks that are threads of one process (the CPU runtime): one channel per ordered pair of
//! ranks. Receives wait at most a timeout, and a peer that has stopped (its endpoint dropped)
//! is noticed at once, so a failed or stalled rank becomes an error naming both ranks and the
//! message instead of a hang.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use fathom_compiler::pipeline::Message;
use fathom_compiler::pipeline::Payload;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tensor::{Data, HostTensor};

/// What a message is, so that a receive takes the one it waits for even when others arrive
/// first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tag {
    /// A pipeline transfer: a stage's output or its input's gradient for one micro-batch.
    Pipeline(Message),
    /// Round `round` of the collective `key` (a parameter name, say).
    Collective { key: String, round: u32 },
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tag::Pipeline(msg) => write!(
                f,
                "{} of micro-batch {} from stage {}",
                match msg.payload {
                    Payload::Activation => "activation",
                    Payload::Gradient => "gradient",
                },
                msg.chunk.mb,
                msg.chunk.stage
            ),
            Tag::Collective { key, round } => write!(f, "collective `{key}` (round {round})"),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CommError {
    #[error("rank {rank}: no {tag} from rank {peer} after {waited:?} (is rank {peer} stalled?)")]
    Timeout {
        rank: usize,
        peer: usize,
        tag: Tag,
        waited: Duration,
    },
    #[error("rank {rank}: rank {peer} stopped before sending the {tag}")]
    PeerStopped { rank: usize, peer: usize, tag: Tag },
    #[error("rank {rank}: cannot send the {tag} to rank {peer}: it has stopped")]
    SendFailed { rank: usize, peer: usize, tag: Tag },
    #[error("rank {rank}: rank {peer} does not exist (world of {world})")]
    NoSuchRank {
        rank: usize,
        peer: usize,
        world: usize,
    },
    #[error("rank {rank}: {what}")]
    Mismatch { rank: usize, what: String },
}

/// A rank's connection to the others.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sends without waiting for the receiver.
    fn send(&mut self, peer: usize, tag: Tag, tensor: HostTensor) -> Result<(), CommError>;
    /// Waits for the message `tag` from `peer`.
    fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError>;

    /// Replaces `values` on every member of `group` (ranks, each listing the same group) by
    /// their sum over the group. The sum is taken in group order on the first member and sent
    /// back, so every member ends with bit-identical values whatever the arrival order.
    fn all_reduce_sum(
        &mut self,
        group: &[usize],
        key: &str,
        values: &mut [f32],
    ) -> Result<(), CommError> {
        let me = self.rank();
        let Some(&root) = group.first() else {
            return Ok(());
        };
        let tag = |round| Tag::Collective {
            key: key.to_owned(),
            round,
        };
        if group.len() == 1 {
            return Ok(());
        }
        if me == root {
            let mut sum = values.to_vec();
            for &peer in &group[1..] {
                let part = self.recv(peer, &tag(0))?;
                let part = floats_of(me, &part, sum.len(), key)?;
                for (s, x) in sum.iter_mut().zip(part) {
                    *s += x;
                }
            }
            for &peer in &group[1..] {
                self.send(peer, tag(1), HostTensor::f32([sum.len()], sum.clone()))?;
            }
            values.copy_from_slice(&sum);
        } else {
            self.send(
                root,
                tag(0),
                HostTensor::f32([values.len()], values.to_vec()),
            )?;
            let sum = self.recv(root, &tag(1))?;
            values.copy_from_slice(floats_of(me, &sum, values.len(), key)?);
        }
        Ok(())
    }

    /// Sends `parts[r]` to every rank r and returns what each rank sent here, by rank.
    fn all_to_all(
        &mut self,
        key: &str,
        parts: Vec<HostTensor>,
    ) -> Result<Vec<HostTensor>, CommError> {
        let everyone: Vec<usize> = (0..self.world()).collect();
        self.all_to_all_in(&everyone, key, parts)
    }

    /// [`Comm::all_to_all`] among the ranks of `group` (this one included, every member
    /// listing the same group): `parts[i]` goes to `group[i]`, and the result holds what each
    /// member sent here, in group order.
    fn all_to_all_in(
        &mut self,
        group: &[usize],
        key: &str,
        parts: Vec<HostTensor>,
    ) -> Result<Vec<HostTensor>, CommError> {
        let me = self.rank();
        check_parts(me, group, key, parts.len())?;
        let tag = Tag::Collective {
            key: key.to_owned(),
            round: 0,
        };
        let mut own = None;
        for (&peer, part) in group.iter().zip(parts) {
            if peer == me {
                own = Some(part);
            } else {
                self.send(peer, tag.clone(), part)?;
            }
        }
        let mut received = Vec::with_capacity(group.len());
        for &peer in group {
            received.push(match peer == me {
                true => own.take().expect("one part is this rank's"),
                false => self.recv(peer, &tag)?,
            });
        }
        Ok(received)
    }

    /// Returns once every rank has reached the barrier `key`.
    fn barrier(&mut self, key: &str) -> Result<(), CommError> {
        let world = self.world();
        let empty = (0..world)
            .map(|_| HostTensor::f32([0], Vec::new()))
            .collect();
        self.all_to_all(key, empty).map(drop)
    }
}

/// Implements [`Comm`] for a pointer to a connection by forwarding every method, the
/// collectives included (a transport may override them, as NCCL's does).
macro_rules! forward_comm {
    ($pointer:ty) => {
        impl<C: Comm + ?Sized> Comm for $pointer {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn world(&self) -> usize {
                (**self).world()
            }
            fn send(&mut self, peer: usize, tag: Tag, tensor: HostTensor) -> Result<(), CommError> {
                (**self).send(peer, tag, tensor)
            }
            fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError> {
                (**self).recv(peer, tag)
            }
            fn all_reduce_sum(
                &mut self,
                group: &[usize],
                key: &str,
                values: &mut [f32],
            ) -> Result<(), CommError> {
                (**self).all_reduce_sum(group, key, values)
            }
            fn all_to_all_in(
                &mut self,
                group: &[usize],
                key: &str,
                parts: Vec<HostTensor>,
            ) -> Result<Vec<HostTensor>, CommError> {
                (**self).all_to_all_in(group, key, parts)
            }
        }
    };
}

// A process holds the transport it was started with (TCP, or NCCL on GPUs) as a
// `Box<dyn Comm>`, and lends it to each step's rank worker as a `&mut`.
forward_comm!(Box<C>);
forward_comm!(&mut C);

/// Checks that an all-to-all `key` has one part per member of `group` and that this rank is
/// one of them.
pub(super) fn check_parts(
    rank: usize,
    group: &[usize],
    key: &str,
    parts: usize,
) -> Result<(), CommError> {
    match parts == group.len() && group.contains(&rank) {
        true => Ok(()),
        false => Err(CommError::Mismatch {
            rank,
            what: format!("all-to-all `{key}` got {parts} parts for the group {group:?}"),
        }),
    }
}

fn floats_of<'a>(
    rank: usize,
    tensor: &'a HostTensor,
    len: usize,
    key: &str,
) -> Result<&'a [f32], CommError> {
    match &tensor.data {
        Data::Float(values) if values.len() == len => Ok(values),
        _ => Err(CommError::Mismatch {
            rank,
            what: format!(
                "all-reduce `{key}`: a member sent {:?}, expected {len} floats",
                tensor.ty
            ),
        }),
    }
}

/// What every transport must do, checked from one rank's side (every rank of the group calls
/// it): a fixed-order all-reduce, an all-to-all that keeps shapes, tagged transfers taken out
/// of order, and a barrier.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) fn collective_suite<C: Comm>(comm: &mut C) {
    use fathom_compiler::pipeline::Chunk;

    let (rank, world) = (comm.rank(), comm.world());
    let everyone: Vec<usize> = (0..world).collect();
    let r = rank as f32;
    let mut values = vec![r, 10.0 * r, f32::MIN_POSITIVE];
    comm.all_reduce_sum(&everyone, "x", &mut values).unwrap();
    let sum = (0..world).map(|k| k as f32).sum::<f32>();
    assert_eq!(values, [sum, 10.0 * sum, world as f32 * f32::MIN_POSITIVE]);

    let parts = (0..world)
        .map(|to| HostTensor::f32([1, 2], vec![r, to as f32]))
        .collect();
    let got = comm.all_to_all("a2a", parts).unwrap();
    for (from, tensor) in got.iter().enumerate() {
        assert_eq!(tensor.dims(), [1, 2]);
        assert_eq!(tensor.as_f32().unwrap(), [from as f32, r]);
    }

    // Two transfers around the ring, sent in one order and taken in the other.
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let tag = |mb: usize, stage: usize| {
        Tag::Pipeline(Message {
            payload: Payload::Activation,
            chunk: Chunk::new(mb, stage),
        })
    };
    for mb in [1, 0] {
        let tensor = HostTensor::i64([2], vec![rank as i64, mb as i64]);
        comm.send(next, tag(mb, rank), tensor).unwrap();
    }
    for mb in [0, 1] {
        let got = comm.recv(prev, &tag(mb, prev)).unwrap();
        assert_eq!(got.as_i64().unwrap(), [prev as i64, mb as i64]);
    }
    comm.barrier("end").unwrap();
}

pub(super) struct Envelope {
    pub(super) tag: Tag,
    pub(super) tensor: HostTensor,
}

/// A rank's incoming messages: one channel per peer (fed by whatever transport), taken by tag,
/// the ones that arrive before they are asked for kept aside.
pub(super) struct Inbox {
    rank: usize,
    from: Vec<Receiver<Envelope>>,
    /// Messages that arrived before anyone asked for them, by sender and tag.
    early: HashMap<(usize, Tag), VecDeque<HostTensor>>,
    timeout: Duration,
}

impl Inbox {
    pub(super) fn new(rank: usize, from: Vec<Receiver<Envelope>>, timeout: Duration) -> Self {
        Inbox {
            rank,
            from,
            early: HashMap::new(),
            timeout,
        }
    }

    pub(super) fn check_peer(&self, peer: usize) -> Result<(), CommError> {
        match peer < self.from.len() {
            true => Ok(()),
            false => Err(CommError::NoSuchRank {
                rank: self.rank,
                peer,
                world: self.from.len(),
            }),
        }
    }

    /// Waits at most the timeout for the message `tag` from `peer`; a peer whose channel
    /// closed (it stopped, or its connection broke) is an error at once.
    pub(super) fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError> {
        self.check_peer(peer)?;
        let key = (peer, tag.clone());
        if let Some(tensor) = self.early.get_mut(&key).and_then(VecDeque::pop_front) {
            return Ok(tensor);
        }
        let started = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(started.elapsed());
            match self.from[peer].recv_timeout(left) {
                Ok(envelope) if envelope.tag == *tag => return Ok(envelope.tensor),
                Ok(envelope) => self
                    .early
                    .entry((peer, envelope.tag))
                    .or_default()
                    .push_back(envelope.tensor),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(CommError::Timeout {
                        rank: self.rank,
                        peer,
                        tag: tag.clone(),
                        waited: started.elapsed(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CommError::PeerStopped {
                        rank: self.rank,
                        peer,
                        tag: tag.clone(),
                    });
                }
            }
        }
    }
}

/// A rank of a group of threads.
pub struct ThreadComm {
    rank: usize,
    to: Vec<Sender<Envelope>>,
    inbox: Inbox,
}

impl fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("world", &self.to.len())
            .field("timeout", &self.inbox.timeout)
            .finish_non_exhaustive()
    }
}

impl ThreadComm {
    /// `world` connected endpoints, endpoint r for rank r; a receive gives up after `timeout`.
    pub fn group(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        // channels[from][to]
        let mut senders: Vec<Vec<Sender<Envelope>>> = (0..world).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Envelope>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        for (from, row) in senders.iter_mut().enumerate() {
            for to_receivers in receivers.iter_mut() {
                let (tx, rx) = channel();
                row.push(tx);
                to_receivers[from] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| {
                let from = from.into_iter().map(|rx| rx.expect("every pair")).collect();
                ThreadComm {
                    rank,
                    to,
                    inbox: Inbox::new(rank, from, timeout),
                }
            })
            .collect()
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, peer: usize, tag: Tag, tensor: HostTensor) -> Result<(), CommError> {
        self.inbox.check_peer(peer)?;
        let rank = self.rank;
        self.to[peer]
            .send(Envelope {
                tag: tag.clone(),
                tensor,
            })
            .map_err(|_| CommError::SendFailed { rank, peer, tag })
    }

    fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError> {
        self.inbox.recv(peer, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_compiler::pipeline::Chunk;

    fn tag(mb: usize) -> Tag {
        Tag::Pipeline(Message {
            payload: Payload::Activation,
            chunk: Chunk::new(mb, 0),
        })
    }

    #[test]
    fn receives_match_tags_whatever_the_arrival_order() {
        let mut comms = ThreadComm::group(2, Duration::from_secs(5));
        let mut b = comms.pop().unwrap();
        let mut a = comms.pop().unwrap();
        a.send(1, tag(0), HostTensor::f32([1], vec![0.0])).unwrap();
        a.send(1, tag(1), HostTensor::f32([1], vec![1.0])).unwrap();
        assert_eq!(b.recv(0, &tag(1)).unwrap().as_f32().unwrap(), [1.0]);
        assert_eq!(b.recv(0, &tag(0)).unwrap().as_f32().unwrap(), [0.0]);
    }

    #[test]
    fn thread_ranks_pass_the_collective_suite() {
        let comms = ThreadComm::group(3, Duration::from_secs(5));
        std::thread::scope(|s| {
            for mut comm in comms {
                s.spawn(move || collective_suite(&mut comm));
            }
        });
    }

    #[test]
    fn a_silent_peer_times_out_and_a_stopped_one_is_noticed() {
        let mut comms = ThreadComm::group(3, Duration::from_millis(50));
        let stopped = comms.pop().unwrap();
        drop(stopped);
        let mut a = comms.remove(0);
        let err = a.recv(1, &tag(3)).unwrap_err();
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    rank: 0,
                    peer: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("micro-batch 3"), "{err}");
        let err = a.recv(2, &tag(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rank 0: rank 2 stopped before sending the activation of micro-batch 0 from stage 0"
        );
        assert!(matches!(
            a.send(2, tag(0), HostTensor::f32([0], vec![])),
            Err(CommError::SendFailed { peer: 2, .. })
        ));
        assert!(matches!(
            a.recv(7, &tag(0)),
            Err(CommError::NoSuchRank { .. })
        ));
    }
}
