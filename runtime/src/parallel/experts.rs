//! Expert parallelism: the routed experts of every MoE layer are split over the ranks of an
//! expert-parallel group (replicas that each train on their own tokens), and every grouped
//! expert GEMM runs where its expert lives.
//!
//! The backends call in here from their grouped-matmul kernels when a run is expert-parallel
//! ([`crate::interp::Feeds::experts`]):
//! - [`products_where_owned`] (forward and input-gradient GEMMs): each rank sends the token
//!   rows routed to another rank's experts to that rank (all-to-all dispatch), every rank
//!   multiplies the rows it received by its own experts' weights, and the products go back
//!   (all-to-all combine);
//! - [`gathered_at_owners`] (weight-gradient GEMMs): the rows and their cotangents go to the
//!   owner, which sums every rank's contributions to its experts' gradients.
//!
//! Every member of a group runs the same program in the same order, so the exchanges match up
//! one for one. Experts are owned in contiguous blocks: expert e on member `e / (E / P)`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::tensor::{Data, HostTensor};

use super::comm::Comm;
#[cfg(test)]
use super::comm::ThreadComm;

/// A rank's view of its expert-parallel group.
pub trait ExpertExchange: Sync {
    /// This rank's index in the group.
    fn member(&self) -> usize;
    /// The group's size.
    fn members(&self) -> usize;
    /// Sends `parts[q]` to member q and returns what every member sent here, by member.
    fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, String>;
}

/// The member that owns expert `expert` of `experts`.
pub fn owner(expert: usize, experts: usize, members: usize) -> usize {
    expert / (experts / members).max(1)
}

/// `requests[e]`: rows for expert e (empty when none). Returns `answers[e]`:
/// `compute(e, rows)` run by the owner of e on this rank's rows.
pub fn products_where_owned(
    exchange: &dyn ExpertExchange,
    requests: Vec<Vec<f32>>,
    compute: &(dyn Fn(usize, &[f32]) -> Vec<f32> + Sync),
) -> Result<Vec<Vec<f32>>, String> {
    let (me, members, experts) = (exchange.member(), exchange.members(), requests.len());
    let asked: Vec<bool> = requests.iter().map(|r| !r.is_empty()).collect();
    let received = exchange.all_to_all(pack(requests, members))?;
    let mut replies = Vec::with_capacity(members);
    for part in received {
        let mut reply = Vec::new();
        for (e, rows) in unpack(&part)? {
            if owner(e, experts, members) != me {
                return Err(format!(
                    "member {me} was sent rows of expert {e}, which it does not own"
                ));
            }
            push_entry(&mut reply, e, &compute(e, rows));
        }
        replies.push(reply);
    }
    let mut answers = vec![Vec::new(); experts];
    for part in exchange.all_to_all(replies)? {
        for (e, product) in unpack(&part)? {
            answers[e] = product.to_vec();
        }
    }
    match (0..experts).find(|&e| asked[e] && answers[e].is_empty()) {
        Some(e) => Err(format!("no answer for the rows of expert {e}")),
        None => Ok(answers),
    }
}

/// `rows[e]`: this rank's data for expert e. Returns, for each expert this rank owns, every
/// member's data for it concatenated in member order (empty for the others).
pub fn gathered_at_owners(
    exchange: &dyn ExpertExchange,
    rows: Vec<Vec<f32>>,
) -> Result<Vec<Vec<f32>>, String> {
    let (me, members, experts) = (exchange.member(), exchange.members(), rows.len());
    let mut gathered = vec![Vec::new(); experts];
    for part in exchange.all_to_all(pack(rows, members))? {
        for (e, data) in unpack(&part)? {
            if owner(e, experts, members) != me {
                return Err(format!(
                    "member {me} was sent data of expert {e}, which it does not own"
                ));
            }
            gathered[e].extend_from_slice(data);
        }
    }
    Ok(gathered)
}

/// One message per member: `[expert, length, values...]*` with the two integers bit-cast into
/// f32 slots (exact for any u32).
fn pack(per_expert: Vec<Vec<f32>>, members: usize) -> Vec<Vec<f32>> {
    let experts = per_expert.len();
    let mut parts = vec![Vec::new(); members];
    for (e, values) in per_expert.into_iter().enumerate() {
        if !values.is_empty() {
            push_entry(&mut parts[owner(e, experts, members)], e, &values);
        }
    }
    parts
}

fn push_entry(part: &mut Vec<f32>, expert: usize, values: &[f32]) {
    part.push(f32::from_bits(expert as u32));
    part.push(f32::from_bits(values.len() as u32));
    part.extend_from_slice(values);
}

fn unpack(part: &[f32]) -> Result<Vec<(usize, &[f32])>, String> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at < part.len() {
        let header = part.get(at..at + 2).ok_or("a truncated expert message")?;
        let (e, len) = (header[0].to_bits() as usize, header[1].to_bits() as usize);
        let values = part
            .get(at + 2..at + 2 + len)
            .ok_or("a truncated expert message")?;
        entries.push((e, values));
        at += 2 + len;
    }
    Ok(entries)
}

/// The exchange of a rank (a thread or a process): its group is given as global ranks, and a counter numbers
/// the exchanges so that each message meets its partner.
pub(super) struct CommExchange<'a, C: Comm> {
    pub(super) comm: &'a Mutex<C>,
    pub(super) group: &'a [usize],
    pub(super) member: usize,
    pub(super) counter: &'a AtomicU64,
}

impl<C: Comm> ExpertExchange for CommExchange<'_, C> {
    fn member(&self) -> usize {
        self.member
    }

    fn members(&self) -> usize {
        self.group.len()
    }

    fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, String> {
        let round = self.counter.fetch_add(1, Ordering::SeqCst);
        let parts = parts
            .into_iter()
            .map(|part| HostTensor::f32([part.len()], part))
            .collect();
        let mut comm = self
            .comm
            .lock()
            .map_err(|_| "the rank's channel is poisoned")?;
        let received = comm
            .all_to_all_in(self.group, &format!("experts.{round}"), parts)
            .map_err(|e| e.to_string())?;
        received
            .into_iter()
            .map(|tensor| match tensor.data {
                Data::Float(values) => Ok(values),
                _ => Err("an expert message that is not f32".to_owned()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rows_reach_their_owner_and_products_come_back() {
        let comms = ThreadComm::group(2, Duration::from_secs(5));
        let group = [0, 1];
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let group = &group;
                    s.spawn(move || {
                        let me = comm.rank();
                        let (comm, counter) = (Mutex::new(comm), AtomicU64::new(0));
                        let exchange = CommExchange {
                            comm: &comm,
                            group,
                            member: me,
                            counter: &counter,
                        };
                        // 4 experts: 0 and 1 on member 0, 2 and 3 on member 1. Each rank asks
                        // experts 0 and 3 with one row [me, e]; "computing" doubles it and adds
                        // the owner's id to check who computed.
                        let requests = (0..4)
                            .map(|e| match e {
                                0 | 3 => vec![me as f32, e as f32],
                                _ => Vec::new(),
                            })
                            .collect();
                        let compute = |e: usize, rows: &[f32]| {
                            assert_eq!(owner(e, 4, 2), me, "computed where owned");
                            rows.iter().map(|x| 2.0 * x + 100.0 * me as f32).collect()
                        };
                        let answers = products_where_owned(&exchange, requests, &compute).unwrap();
                        let gathered =
                            gathered_at_owners(&exchange, vec![vec![me as f32]; 4]).unwrap();
                        (answers, gathered)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (me, (answers, gathered)) in results.into_iter().enumerate() {
            let me = me as f32;
            assert_eq!(answers[0], vec![2.0 * me, 0.0]);
            assert_eq!(answers[3], vec![2.0 * me + 100.0, 6.0 + 100.0]);
            assert!(answers[1].is_empty() && answers[2].is_empty());
            // Every member's value for each owned expert, in member order.
            let owned: Vec<usize> = (0..4).filter(|&e| owner(e, 4, 2) as f32 == me).collect();
            for (e, got) in gathered.iter().enumerate() {
                let want = if owned.contains(&e) {
                    vec![0.0, 1.0]
                } else {
                    vec![]
                };
                assert_eq!(got, &want, "expert {e} on member {me}");
            }
        }
    }
}
