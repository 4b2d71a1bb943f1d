//! The transports the stream benchmarks compare: roam and its baselines (raw TCP, TLS 1.3 over
//! TCP, a quinn stream). Each gives a connected pair of byte streams from 127.0.0.2 to
//! 127.0.0.3, boxed behind one type so every benchmark loop treats them alike.
//!
//! roam comes in three variants: [`Transport::RoamEncrypted`] (the default configuration, which
//! negotiates AES-256-GCM on every frame), and [`Transport::RoamChaCha`] (ChaCha20-Poly1305, the
//! suite for CPUs without AES instructions), compared with TLS and quinn, and
//! [`Transport::Roam`] (`EndpointConfig::insecure_plaintext`), compared with raw TCP.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::{host, within, BoxError};

/// The name the self-signed certificate is issued to, and the client asks for.
const SERVER_NAME: &str = "localhost";
/// ALPN of the QUIC connections (QUIC requires one).
const ALPN: &[u8] = b"roam-bench";
/// Bound of each connection setup step.
const SETUP: Duration = Duration::from_secs(10);

/// A byte stream of any transport.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// One end of a connected pair.
pub(crate) type BoxStream = Box<dyn Duplex>;

/// A connected pair: `client` (127.0.0.2) and `server` (127.0.0.3), and what must outlive them
/// (endpoints, connections).
pub(crate) struct Pair {
    pub client: BoxStream,
    pub server: BoxStream,
    pub keep: Box<dyn Any + Send>,
}

/// A transport under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// One roam stream in the insecure plaintext mode (`EndpointConfig::insecure_plaintext`).
    Roam,
    /// One roam stream in the default, encrypted mode (AES-256-GCM sealed frames, negotiated).
    RoamEncrypted,
    /// One roam stream whose endpoints accept only ChaCha20-Poly1305.
    RoamChaCha,
    /// A raw tokio `TcpStream`, nodelay on both ends.
    RawTcp,
    /// TLS 1.3 over a nodelay `TcpStream` (tokio-rustls, ring provider, self-signed certificate).
    Tls,
    /// One bidirectional stream of a quinn (QUIC) connection (ring provider, self-signed
    /// certificate, default transport configuration).
    Quinn,
}

impl Transport {
    /// The short name used in tables (`against`).
    pub(crate) fn short(self) -> &'static str {
        match self {
            Transport::Roam => "roam",
            Transport::RoamEncrypted => "encrypted roam",
            Transport::RoamChaCha => "roam ChaCha20",
            Transport::RawTcp => "raw TCP",
            Transport::Tls => "TLS 1.3/TCP",
            Transport::Quinn => "quinn",
        }
    }

    /// The full description used in a benchmark's baseline list.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Transport::Roam => "roam stream (insecure plaintext mode)",
            Transport::RoamEncrypted => "encrypted roam = roam stream, default configuration (AES-256-GCM negotiated)",
            Transport::RoamChaCha => "roam ChaCha20 = roam stream, endpoints accepting only ChaCha20-Poly1305",
            Transport::RawTcp => "raw TCP = tokio TcpStream, nodelay",
            Transport::Tls => "TLS 1.3/TCP = tokio-rustls over nodelay TcpStream, ring, rustls' default TLS 1.3 suites",
            Transport::Quinn => "quinn = one stream of a quinn 0.11 connection, ring, default transport config",
        }
    }

    /// A fresh connected pair.
    pub(crate) async fn pair(self, crypto: &Crypto) -> Result<Pair, BoxError> {
        match self {
            Transport::Roam | Transport::RoamEncrypted | Transport::RoamChaCha => {
                let mut config = roam::EndpointConfig::default();
                config.insecure_plaintext = self == Transport::Roam;
                if self == Transport::RoamChaCha {
                    config.suites = vec![roam::Suite::ChaCha20Poly1305];
                }
                let a = roam::Endpoint::bind_with(host(2), config.clone()).await?;
                let b = roam::Endpoint::bind_with(host(3), config).await?;
                let (s, t) = within(SETUP, "roam connect", async {
                    let (s, t) = tokio::join!(a.connect(b.local_addr()), b.accept());
                    Ok::<_, BoxError>((s?, t?))
                })
                .await?;
                Ok(Pair {
                    client: Box::new(s),
                    server: Box::new(t),
                    keep: Box::new([a, b]),
                })
            }
            Transport::RawTcp => {
                let (c, s) = raw_pair().await?;
                Ok(Pair {
                    client: Box::new(c),
                    server: Box::new(s),
                    keep: Box::new(()),
                })
            }
            Transport::Tls => {
                let (c, s) = raw_pair().await?;
                let connector = tokio_rustls::TlsConnector::from(crypto.tls_client.clone());
                let acceptor = tokio_rustls::TlsAcceptor::from(crypto.tls_server.clone());
                let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)?;
                let (c, s) = within(SETUP, "TLS handshake", async {
                    let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
                    Ok::<_, BoxError>((c?, s?))
                })
                .await?;
                Ok(Pair {
                    client: Box::new(c),
                    server: Box::new(s),
                    keep: Box::new(()),
                })
            }
            Transport::Quinn => {
                let q = QuinnPair::connect(crypto, host(2)).await?;
                Ok(Pair {
                    client: Box::new(tokio::io::join(q.recv, q.send)),
                    server: Box::new(tokio::io::join(q.server_recv, q.server_send)),
                    keep: Box::new((q.client, q.server, q.conns)),
                })
            }
        }
    }
}

/// A connected raw TCP pair, 127.0.0.2 → 127.0.0.3, nodelay on both ends.
pub(crate) async fn raw_pair() -> Result<(TcpStream, TcpStream), BoxError> {
    let l = TcpListener::bind(host(3)).await?;
    let addr = l.local_addr()?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(host(2))?;
    let (c, s) = within(SETUP, "TCP connect", async {
        let (c, s) = tokio::join!(sock.connect(addr), l.accept());
        Ok::<_, std::io::Error>((c?, s?.0))
    })
    .await?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// The TLS and QUIC configurations of one run: a self-signed certificate generated at run time
/// (rcgen, ECDSA P-256) for [`SERVER_NAME`], the server using it and the client trusting only
/// it. TLS 1.3 only, the ring provider.
pub(crate) struct Crypto {
    tls_server: Arc<rustls::ServerConfig>,
    tls_client: Arc<rustls::ClientConfig>,
    quic_server: quinn::ServerConfig,
    quic_client: quinn::ClientConfig,
}

impl Crypto {
    /// Generate the certificate and build the configurations.
    pub(crate) fn new() -> Result<Crypto, BoxError> {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let issued = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        let cert = issued.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone())?;

        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut quic_server = server.clone();
        quic_server.alpn_protocols = vec![ALPN.to_vec()];
        let mut quic_client = client.clone();
        quic_client.alpn_protocols = vec![ALPN.to_vec()];
        let quic_server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(quic_server)?,
        ));
        let quic_client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(quic_client)?,
        ));
        Ok(Crypto {
            tls_server: Arc::new(server),
            tls_client: Arc::new(client),
            quic_server,
            quic_client,
        })
    }
}

/// A quinn connection from a client endpoint to a server endpoint (127.0.0.3) with one open
/// bidirectional stream, both of its ends accepted.
pub(crate) struct QuinnPair {
    pub client: quinn::Endpoint,
    pub server: quinn::Endpoint,
    pub conns: (quinn::Connection, quinn::Connection),
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub server_send: quinn::SendStream,
    pub server_recv: quinn::RecvStream,
}

impl QuinnPair {
    /// Connect a client endpoint bound at `client_addr` and open the stream (the client writes
    /// one byte, so that the server can accept the stream, and the server reads it).
    pub(crate) async fn connect(
        crypto: &Crypto,
        client_addr: std::net::SocketAddr,
    ) -> Result<QuinnPair, BoxError> {
        let server = quinn::Endpoint::server(crypto.quic_server.clone(), host(3))?;
        let client = quinn::Endpoint::client(client_addr)?;
        let to = server.local_addr()?;
        let connecting = client.connect_with(crypto.quic_client.clone(), to, SERVER_NAME)?;
        within(SETUP, "quinn connect", async move {
            let incoming = async {
                let inc = server
                    .accept()
                    .await
                    .ok_or("quinn server endpoint closed")?;
                Ok::<_, BoxError>(inc.await?)
            };
            let (c, s) = tokio::join!(connecting, incoming);
            let (c, s) = (c?, s?);
            let (mut send, recv) = c.open_bi().await?;
            send.write_all(&[1]).await?;
            let (server_send, mut server_recv) = s.accept_bi().await?;
            let mut hello = [0u8; 1];
            server_recv.read_exact(&mut hello).await?;
            Ok::<_, BoxError>(QuinnPair {
                client,
                server,
                conns: (c, s),
                send,
                recv,
                server_send,
                server_recv,
            })
        })
        .await
    }
}
