//! [`Comm`] between processes over TCP, started the way `torchrun`, `mpirun` or Slurm start
//! PyTorch jobs: every process reads `MASTER_ADDR`, `MASTER_PORT`, `RANK` and `WORLD_SIZE`
//! ([`Rendezvous::from_env`]).
//!
//! Rank 0 listens on the master address; every other rank connects to it (that connection is
//! their link) and registers the port it listens on; rank 0 answers with everyone's address,
//! and each rank then connects to the ranks below it and accepts the ranks above, so that every
//! pair shares one connection. A reader thread per connection turns frames into messages for
//! the same [`Inbox`](super::comm) the thread transport uses: receives are matched by tag, wait
//! at most the timeout, and a closed connection is a stopped peer at once.
//!
//! A frame is a length-prefixed JSON header (the tag and the tensor type) and the tensor's
//! little-endian bytes.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use fathom_compiler::{DType, TensorType};
use serde::{Deserialize, Serialize};

use crate::tensor::{Data, HostTensor};

use super::comm::{Comm, CommError, Envelope, Inbox, Tag};

/// Where and as whom a process joins its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens.
    pub master: String,
    pub rank: usize,
    pub world: usize,
}

/// Where each launcher puts a process's rank, its group's size and its rank on the node, in the
/// order they are looked up: torchrun's names, then Open MPI's, MPICH/Intel MPI's (PMI) and
/// Slurm's (`srun`), so `mpirun` and `srun` start a group without a wrapper script (they do not
/// set `MASTER_ADDR`/`MASTER_PORT`: the job script exports those).
const RANK_VARS: [&str; 4] = ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"];
const WORLD_VARS: [&str; 4] = [
    "WORLD_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "SLURM_NTASKS",
];
const LOCAL_RANK_VARS: [&str; 4] = [
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];

impl Rendezvous {
    /// From `MASTER_ADDR`, `MASTER_PORT`, and the rank and group size as torchrun, `mpirun`
    /// (Open MPI, MPICH) or `srun` set them; an error names the variable that is missing or
    /// malformed.
    pub fn from_env() -> Result<Rendezvous, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Rendezvous::from_env`], with the variables looked up by `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Rendezvous, String> {
        let address = get("MASTER_ADDR")
            .ok_or_else(|| "the environment variable MASTER_ADDR is not set".to_owned())?;
        let port = first_number(&get, &["MASTER_PORT"])?;
        let rendezvous = Rendezvous {
            master: format!("{address}:{port}"),
            rank: first_number(&get, &RANK_VARS)?,
            world: first_number(&get, &WORLD_VARS)?,
        };
        if rendezvous.world == 0 || rendezvous.rank >= rendezvous.world {
            return Err(format!(
                "RANK={} must be below WORLD_SIZE={}",
                rendezvous.rank, rendezvous.world
            ));
        }
        Ok(rendezvous)
    }
}

/// This process's rank on its node (`LOCAL_RANK` or a launcher's equivalent, see
/// [`Rendezvous::from_env`]), `None` when no launcher set one.
pub fn local_rank_from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<usize>, String> {
    if LOCAL_RANK_VARS.iter().all(|name| get(name).is_none()) {
        return Ok(None);
    }
    first_number(&get, &LOCAL_RANK_VARS).map(Some)
}

/// The value of the first of `names` that is set, as a non-negative integer.
fn first_number(get: &impl Fn(&str) -> Option<String>, names: &[&str]) -> Result<usize, String> {
    let Some((name, text)) = names
        .iter()
        .find_map(|name| get(name).map(|text| (*name, text)))
    else {
        let others = match names {
            [_, rest @ ..] if !rest.is_empty() => format!(" (nor {})", rest.join(", ")),
            _ => String::new(),
        };
        return Err(format!(
            "the environment variable {} is not set{others}",
            names[0]
        ));
    };
    text.trim()
        .parse()
        .map_err(|_| format!("{name}=`{text}` is not a non-negative integer"))
}

/// This process's connections to the others.
pub struct TcpComm {
    rank: usize,
    /// Writers to every peer (`None` at this rank's own index).
    to: Vec<Option<BufWriter<TcpStream>>>,
    /// Messages a rank sends itself.
    loopback: Sender<Envelope>,
    inbox: Inbox,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.rank)
            .field("world", &self.to.len())
            .finish_non_exhaustive()
    }
}

/// The first message on every connection: who is calling, and where it listens.
#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    port: u16,
}

#[derive(Serialize, Deserialize)]
struct Header {
    tag: Tag,
    ty: TensorType,
}

fn setup_error(rank: usize, what: impl std::fmt::Display) -> CommError {
    CommError::Mismatch {
        rank,
        what: format!("joining the group: {what}"),
    }
}

impl TcpComm {
    /// Joins the group: waits up to `timeout` for everyone to connect, and later receives wait
    /// up to `timeout` too.
    pub fn connect(rendezvous: &Rendezvous, timeout: Duration) -> Result<TcpComm, CommError> {
        let Rendezvous {
            master,
            rank,
            world,
        } = rendezvous.clone();
        let fail = |what: String| setup_error(rank, what);
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if rank == 0 {
            let listener = TcpListener::bind(&master)
                .map_err(|e| fail(format!("cannot listen on {master}: {e}")))?;
            let mut addresses = vec![String::new(); world];
            for _ in 1..world {
                let mut stream = accept_before(&listener, deadline).map_err(&fail)?;
                let hello: Hello = read_json(&mut stream).map_err(&fail)?;
                let ip = stream.peer_addr().map_err(|e| fail(e.to_string()))?.ip();
                if hello.rank == 0 || hello.rank >= world || links[hello.rank].is_some() {
                    return Err(fail(format!(
                        "a second or unknown rank {} registered",
                        hello.rank
                    )));
                }
                addresses[hello.rank] = SocketAddr::new(ip, hello.port).to_string();
                links[hello.rank] = Some(stream);
            }
            for stream in links.iter_mut().flatten() {
                write_json(stream, &addresses).map_err(&fail)?;
            }
        } else {
            let listener =
                TcpListener::bind("0.0.0.0:0").map_err(|e| fail(format!("cannot listen: {e}")))?;
            let port = listener
                .local_addr()
                .map_err(|e| fail(e.to_string()))?
                .port();
            let mut to_master = connect_before(&master, deadline).map_err(&fail)?;
            write_json(&mut to_master, &Hello { rank, port }).map_err(&fail)?;
            let addresses: Vec<String> = read_json(&mut to_master).map_err(&fail)?;
            links[0] = Some(to_master);
            for (peer, address) in addresses.iter().enumerate().take(rank).skip(1) {
                let mut stream = connect_before(address, deadline).map_err(&fail)?;
                write_json(&mut stream, &Hello { rank, port }).map_err(&fail)?;
                links[peer] = Some(stream);
            }
            for _ in rank + 1..world {
                let mut stream = accept_before(&listener, deadline).map_err(&fail)?;
                let hello: Hello = read_json(&mut stream).map_err(&fail)?;
                if hello.rank <= rank || hello.rank >= world || links[hello.rank].is_some() {
                    return Err(fail(format!(
                        "unexpected connection from rank {}",
                        hello.rank
                    )));
                }
                links[hello.rank] = Some(stream);
            }
        }

        // Messages to itself go through a loopback channel.
        let (loopback, own) = channel();
        let mut own = Some(own);
        let mut from = Vec::with_capacity(world);
        let mut to = Vec::with_capacity(world);
        for (peer, link) in links.into_iter().enumerate() {
            match link {
                None => {
                    from.push(
                        own.take()
                            .ok_or_else(|| fail("two links to itself".into()))?,
                    );
                    to.push(None);
                }
                Some(stream) => {
                    stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
                    let reader = stream.try_clone().map_err(|e| fail(e.to_string()))?;
                    let (tx, rx) = channel();
                    std::thread::Builder::new()
                        .name(format!("fathom-comm-{rank}<-{peer}"))
                        .spawn(move || read_frames(reader, tx))
                        .map_err(|e| fail(e.to_string()))?;
                    from.push(rx);
                    to.push(Some(BufWriter::new(stream)));
                }
            }
        }
        Ok(TcpComm {
            rank,
            to,
            loopback,
            inbox: Inbox::new(rank, from, timeout),
        })
    }
}

/// Closing the connections ends the peers' reader threads, which tells them this rank is gone.
impl Drop for TcpComm {
    fn drop(&mut self) {
        for writer in self.to.iter_mut().flatten() {
            let _ = writer.flush();
            let _ = writer.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, peer: usize, tag: Tag, tensor: HostTensor) -> Result<(), CommError> {
        self.inbox.check_peer(peer)?;
        let rank = self.rank;
        let failed = |tag: Tag| CommError::SendFailed { rank, peer, tag };
        match self.to[peer].as_mut() {
            None => self
                .loopback
                .send(Envelope {
                    tag: tag.clone(),
                    tensor,
                })
                .map_err(|_| failed(tag)),
            Some(writer) => write_frame(writer, &tag, &tensor).map_err(|_| failed(tag)),
        }
    }

    fn recv(&mut self, peer: usize, tag: &Tag) -> Result<HostTensor, CommError> {
        self.inbox.recv(peer, tag)
    }
}

fn connect_before(address: &str, deadline: Instant) -> Result<TcpStream, String> {
    loop {
        let error = match address.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => e.to_string(),
                },
                None => format!("{address} resolves to no address"),
            },
            Err(e) => format!("cannot resolve {address}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(format!("cannot connect to {address} in time: {error}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn accept_before(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("the other ranks did not all connect in time".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn write_json(stream: &mut TcpStream, value: &impl Serialize) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    stream
        .write_all(&(bytes.len() as u32).to_le_bytes())
        .and_then(|()| stream.write_all(&bytes))
        .map_err(|e| e.to_string())
}

fn read_json<T: for<'de> Deserialize<'de>>(stream: &mut impl Read) -> Result<T, String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn write_frame(
    writer: &mut BufWriter<TcpStream>,
    tag: &Tag,
    tensor: &HostTensor,
) -> std::io::Result<()> {
    let header = serde_json::to_vec(&Header {
        tag: tag.clone(),
        ty: tensor.ty.clone(),
    })
    .map_err(std::io::Error::other)?;
    writer.write_all(&(header.len() as u32).to_le_bytes())?;
    writer.write_all(&header)?;
    match &tensor.data {
        Data::Float(values) => values
            .iter()
            .try_for_each(|v| writer.write_all(&v.to_le_bytes()))?,
        Data::Int(values) => values
            .iter()
            .try_for_each(|v| writer.write_all(&v.to_le_bytes()))?,
        Data::Bool(values) => values
            .iter()
            .try_for_each(|&v| writer.write_all(&[u8::from(v)]))?,
    }
    writer.flush()
}

/// Reads frames until the connection closes; dropping `to` then tells the inbox the peer is
/// gone.
fn read_frames(stream: TcpStream, to: Sender<Envelope>) {
    let mut reader = BufReader::new(stream);
    while let Ok(Header { tag, ty }) = read_json::<Header>(&mut reader) {
        let count = ty.numel();
        let data = match ty.dtype {
            DType::I32 | DType::I64 => {
                read_values(&mut reader, count, i64::from_le_bytes).map(Data::Int)
            }
            DType::Bool => read_values(&mut reader, count, |b: [u8; 1]| b[0] != 0).map(Data::Bool),
            _ => read_values(&mut reader, count, f32::from_le_bytes).map(Data::Float),
        };
        let Ok(data) = data else { return };
        if to
            .send(Envelope {
                tag,
                tensor: HostTensor { ty, data },
            })
            .is_err()
        {
            return;
        }
    }
}

fn read_values<const N: usize, T>(
    reader: &mut impl Read,
    count: usize,
    decode: impl Fn([u8; N]) -> T,
) -> std::io::Result<Vec<T>> {
    let mut bytes = vec![0u8; count * N];
    reader.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| decode(c.try_into().expect("chunks of N bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::collective_suite;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn processes_style_ranks_connect_and_pass_the_collective_suite() {
        let master = format!("127.0.0.1:{}", free_port());
        let world = 3;
        std::thread::scope(|s| {
            for rank in 0..world {
                let rendezvous = Rendezvous {
                    master: master.clone(),
                    rank,
                    world,
                };
                s.spawn(move || {
                    let mut comm = TcpComm::connect(&rendezvous, Duration::from_secs(20)).unwrap();
                    collective_suite(&mut comm);
                });
            }
        });
    }

    #[test]
    fn a_rank_that_leaves_is_noticed_and_a_missing_one_times_out() {
        let master = format!("127.0.0.1:{}", free_port());
        let rendezvous = |rank| Rendezvous {
            master: master.clone(),
            rank,
            world: 2,
        };
        let tag = Tag::Collective {
            key: "never".into(),
            round: 0,
        };
        std::thread::scope(|s| {
            let leaver = s
                .spawn(|| drop(TcpComm::connect(&rendezvous(1), Duration::from_secs(20)).unwrap()));
            let mut comm = TcpComm::connect(&rendezvous(0), Duration::from_secs(20)).unwrap();
            leaver.join().unwrap();
            let err = comm.recv(1, &tag).unwrap_err();
            assert!(
                matches!(err, CommError::PeerStopped { peer: 1, .. }),
                "{err}"
            );
        });
        // Nobody else comes: rank 0 gives up after its timeout, naming what it waited for.
        let lonely = Rendezvous {
            master: format!("127.0.0.1:{}", free_port()),
            rank: 0,
            world: 2,
        };
        let err = TcpComm::connect(&lonely, Duration::from_millis(200)).unwrap_err();
        assert!(
            err.to_string().contains("did not all connect in time"),
            "{err}"
        );
    }

    #[test]
    fn the_launcher_variables_are_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let ok = Rendezvous::from_vars(vars(&[
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
        ]))
        .unwrap();
        assert_eq!(
            ok,
            Rendezvous {
                master: "node0:29500".into(),
                rank: 3,
                world: 8
            }
        );
        let err = Rendezvous::from_vars(vars(&[("MASTER_PORT", "1")])).unwrap_err();
        assert_eq!(err, "the environment variable MASTER_ADDR is not set");
        let err =
            Rendezvous::from_vars(vars(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "x")])).unwrap_err();
        assert_eq!(err, "MASTER_PORT=`x` is not a non-negative integer");
        let err = Rendezvous::from_vars(vars(&[
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
        ]))
        .unwrap_err();
        assert_eq!(err, "RANK=2 must be below WORLD_SIZE=2");
        let err =
            Rendezvous::from_vars(vars(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "1")])).unwrap_err();
        assert_eq!(
            err,
            "the environment variable RANK is not set \
             (nor OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID)"
        );
    }

    #[test]
    fn mpirun_and_srun_ranks_are_read_when_torchrun_names_are_absent() {
        let lookup = |pairs: Vec<(&'static str, &'static str)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        for (rank, world, local) in [
            (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ] {
            let pairs = vec![
                ("MASTER_ADDR", "node0"),
                ("MASTER_PORT", "29500"),
                (rank, "5"),
                (world, "8"),
                (local, "1"),
            ];
            let found = Rendezvous::from_vars(lookup(pairs.clone())).unwrap();
            assert_eq!((found.rank, found.world), (5, 8), "{rank}");
            assert_eq!(local_rank_from_vars(lookup(pairs)), Ok(Some(1)), "{local}");
        }
        // torchrun's names win over a launcher's underneath it.
        let both = lookup(vec![
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
            ("RANK", "1"),
            ("SLURM_PROCID", "0"),
            ("WORLD_SIZE", "2"),
        ]);
        assert_eq!(Rendezvous::from_vars(both).unwrap().rank, 1);
        assert_eq!(local_rank_from_vars(lookup(vec![])), Ok(None));
        assert_eq!(
            local_rank_from_vars(lookup(vec![("SLURM_LOCALID", "x")])),
            Err("SLURM_LOCALID=`x` is not a non-negative integer".to_owned())
        );
    }
}
