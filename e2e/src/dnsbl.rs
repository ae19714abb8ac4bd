//! A blocklist for the operator's DNSBL watch: a UDP DNS server on loopback answering from a table the test
//! controls. Listed names get their 127.0.0.x code, names under a zone marked broken get SERVFAIL, everything else
//! NXDOMAIN (not listed). The operator under test asks it (`--dnsbl-nameserver`, see `operator.rs`).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Where the operators of the e2e suites send their DNSBL queries.
pub const DNSBL_SERVER: &str = "127.0.0.1:15353";

#[derive(Debug, Default)]
struct Table {
    /// Fully qualified query name (lowercase, trailing dot) to return code.
    listed: HashMap<String, Ipv4Addr>,
    /// Zones (lowercase, no trailing dot) that answer SERVFAIL.
    broken: Vec<String>,
}

/// The running server; stops when dropped.
#[derive(Debug)]
pub struct BlocklistServer {
    table: Arc<Mutex<Table>>,
    task: JoinHandle<()>,
}

impl BlocklistServer {
    pub async fn start() -> Self {
        let socket = UdpSocket::bind(DNSBL_SERVER)
            .await
            .unwrap_or_else(|err| panic!("cannot listen on {DNSBL_SERVER}/udp: {err}"));
        let table = Arc::new(Mutex::new(Table::default()));
        let answers = Arc::clone(&table);
        let task = tokio::spawn(async move {
            let mut buffer = [0u8; 1500];
            while let Ok((len, peer)) = socket.recv_from(&mut buffer).await {
                let Ok(query) = Message::from_vec(&buffer[..len]) else {
                    continue;
                };
                let reply = answer(&query, &answers);
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        Self { table, task }
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
        self.task.abort();
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
