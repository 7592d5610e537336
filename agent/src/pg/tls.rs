//! TLS for replication connections (rustls), with libpq's sslmode semantics, and the
//! `tls-server-end-point` channel-binding data for SCRAM-SHA-256-PLUS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;

use super::conninfo::{RootCert, SslMode};
use super::error::{PgError, Result};

/// How the server certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypt only (libpq's prefer/require without a root certificate).
    None,
    /// Chain to a trusted root; any name.
    Ca,
    /// Chain and host name.
    Full,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// `~/.postgresql/root.crt`, libpq's default root certificate file.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(Path::new(&home).join(".postgresql").join("root.crt"))
}

/// The rustls client configuration for `mode` (None for `disable`).
pub(crate) fn client_config(
    mode: SslMode,
    rootcert: Option<&RootCert>,
) -> Result<Option<Arc<ClientConfig>>> {
    // libpq: with a root certificate file present, require behaves like verify-ca.
    let default_file = || {
        default_root_cert()
            .filter(|p| p.is_file())
            .map(RootCert::File)
    };
    let (verify, roots) = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => (Verify::None, None),
        SslMode::Require => match rootcert.cloned().or_else(default_file) {
            Some(r) => (Verify::Ca, Some(r)),
            None => (Verify::None, None),
        },
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = rootcert
                .cloned()
                .or_else(default_file)
                .unwrap_or(RootCert::System);
            let v = if mode == SslMode::VerifyFull {
                Verify::Full
            } else {
                Verify::Ca
            };
            (v, Some(roots))
        }
    };
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::config(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (verify, roots) {
        (Verify::None, _) | (_, None) => Arc::new(NoVerification(provider)),
        (v, Some(roots)) => {
            let store = Arc::new(load_roots(&roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                .build()
                .map_err(|e| PgError::config(format!("TLS setup: {e}")))?;
            if v == Verify::Full {
                webpki
            } else {
                Arc::new(IgnoreName(webpki))
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn load_roots(roots: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCert::File(path) => {
            if !path.is_file() {
                return Err(PgError::config(format!(
                    "root certificate file \"{}\" does not exist; either provide the file or \
                     change sslmode to disable server certificate verification",
                    path.display()
                )));
            }
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::config(format!(
                        "read root certificates from \"{}\": {e}",
                        path.display()
                    ))
                })?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(PgError::config(format!(
                    "no usable certificate in root certificate file \"{}\"",
                    path.display()
                )));
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(PgError::config(
                    "no trusted root certificates found in the system store (set sslrootcert)",
                ));
            }
        }
    }
    Ok(store)
}

/// The name rustls checks (verify-full) and sends as SNI (host names only).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| PgError::config(format!("invalid TLS server name \"{host}\": {e}")))
}

/// Accepts any certificate (sslmode=prefer/require without a root certificate) but still
/// checks the handshake signatures, so the session key is bound to the presented key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the full webpki chain check, minus the host name.
#[derive(Debug)]
struct IgnoreName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// RFC 5929 `tls-server-end-point` data: the hash of the server certificate (DER) with the
/// hash of its signature algorithm, SHA-256 for MD5/SHA-1. None for algorithms PostgreSQL
/// itself cannot bind (Ed25519, RSA-PSS) or a certificate we cannot parse; SCRAM then runs
/// without channel binding.
pub(crate) fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(cert_der)?;
    // DER contents of the OIDs.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    enum H {
        S224,
        S256,
        S384,
        S512,
    }
    let h = if let Some(last) = oid.strip_prefix(RSA) {
        match last {
            [0x04] | [0x05] | [0x0b] => H::S256, // md5, sha1, sha256 WithRSAEncryption
            [0x0c] => H::S384,
            [0x0d] => H::S512,
            [0x0e] => H::S224,
            _ => return None,
        }
    } else if oid == ECDSA_SHA1 {
        H::S256
    } else if let Some(last) = oid.strip_prefix(ECDSA_SHA2) {
        match last {
            [0x01] => H::S224,
            [0x02] => H::S256,
            [0x03] => H::S384,
            [0x04] => H::S512,
            _ => return None,
        }
    } else {
        return None;
    };
    Some(match h {
        H::S224 => sha2::Sha224::digest(cert_der).to_vec(),
        H::S256 => sha2::Sha256::digest(cert_der).to_vec(),
        H::S384 => sha2::Sha384::digest(cert_der).to_vec(),
        H::S512 => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, .. }, .. }
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_element(der, 0x30)?;
    let (_tbs, rest) = der_any(cert)?;
    let (alg, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(alg, 0x06)?;
    Some(oid)
}

/// (contents, rest) of the element at the front of `b` if its tag is `tag`.
fn der_element(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    der_any(b)
}

fn der_any(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_len = *b.get(1)?;
    let (len, hdr) = if first_len < 0x80 {
        (first_len as usize, 2)
    } else {
        let n = (first_len & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((b.get(hdr..end)?, b.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walk_survives_garbage() {
        for bad in [
            &b""[..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x02, 0x30],
        ] {
            assert!(tls_server_end_point(bad).is_none());
        }
        // SEQUENCE { SEQUENCE {}, SEQUENCE { OID ecdsa-with-SHA256 } }
        let cert = [
            0x30, 0x0e, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
            0x03, 0x02,
        ];
        assert_eq!(
            tls_server_end_point(&cert).unwrap(),
            sha2::Sha256::digest(cert).to_vec()
        );
    }
}
