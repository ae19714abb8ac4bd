//! A blocklist for the operator's DNSBL watch: a UDP DNS server on loopback answering from a table the test
//! controls. Listed names get their 127.0.0.x code, names under a zone marked broken get SERVFAIL, everything else
//! NXDOMAIN (not listed). The operator under test asks it (`--dnsbl-nameserver`, see `operator.rs`).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The server's socket, bound once per test process to a free loopback port: suites running side by side (and the
/// operators each starts) never contend for one port, and a server that stopped leaves the port to the next one.
fn socket() -> &'static UdpSocket {
    static SOCKET: OnceLock<UdpSocket> = OnceLock::new();
    SOCKET.get_or_init(|| {
        UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|err| panic!("cannot listen on a loopback UDP port: {err}"))
    })
}

/// Where the operators this test process starts send their DNSBL queries.
pub fn address() -> String {
    socket()
        .local_addr()
        .unwrap_or_else(|err| panic!("the blocklist socket has no address: {err}"))
        .to_string()
}

#[derive(Debug, Default)]
struct Table {
    /// Fully qualified query name (lowercase, trailing dot) to return code.
    listed: HashMap<String, Ipv4Addr>,
    /// Zones (lowercase, no trailing dot) that answer SERVFAIL.
    broken: Vec<String>,
}

/// The running server, on a thread of its own: dropping it stops the thread before the drop returns, so the next
/// test's server alone answers. (A task on the test's runtime ran on until that runtime shut down, after the next
/// test's server had started.)
#[derive(Debug)]
pub struct BlocklistServer {
    table: Arc<Mutex<Table>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the server thread looks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(50);

impl BlocklistServer {
    pub fn start() -> Self {
        let socket = socket()
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot share the blocklist socket: {err}"));
        socket
            .set_read_timeout(Some(STOP_POLL))
            .unwrap_or_else(|err| panic!("cannot set a read timeout on the blocklist socket: {err}"));
        let table = Arc::new(Mutex::new(Table::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (answers, stopping) = (Arc::clone(&table), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            while !stopping.load(Ordering::Relaxed) {
                let (len, peer) = match socket.recv_from(&mut buffer) {
                    Ok(received) => received,
                    Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                    Err(_) => break,
                };
                let Ok(query) = Message::from_vec(&buffer[..len]) else {
                    continue;
                };
                let reply = answer(&query, &answers);
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer);
                }
            }
        });
        Self {
            table,
            stop,
            thread: Some(thread),
        }
    }

    /// Lists `address` (IPv4) in `zone` with return code `code`.
    pub fn list(&self, address: Ipv4Addr, zone: &str, code: Ipv4Addr) {
        let [a, b, c, d] = address.octets();
        let name = format!("{d}.{c}.{b}.{a}.{}.", zone.trim_end_matches('.')).to_ascii_lowercase();
        if let Ok(mut table) = self.table.lock() {
            table.listed.insert(name, code);
        }
    }

    /// Makes every query under `zone` fail with SERVFAIL.
    pub fn break_zone(&self, zone: &str) {
        if let Ok(mut table) = self.table.lock() {
            table.broken.push(zone.trim_end_matches('.').to_ascii_lowercase());
        }
    }
}

impl Drop for BlocklistServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(query: &Message, table: &Mutex<Table>) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    let Some(question) = query.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    let name = question.name().to_ascii().to_ascii_lowercase();
    let Ok(table) = table.lock() else {
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply;
    };
    let bare = name.trim_end_matches('.');
    if table.broken.iter().any(|zone| bare.ends_with(&format!(".{zone}"))) {
        reply.metadata.response_code = ResponseCode::ServFail;
    } else if let Some(code) = table.listed.get(&name) {
        if question.query_type() == RecordType::A {
            reply
                .answers
                .push(Record::from_rdata(question.name().clone(), 60, RData::A(A(*code))));
        }
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply
}
