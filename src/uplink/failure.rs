//! Why an uplink connection failed, as one value of the closed set
//! [`UplinkFailure`], derived from the [`LinkError`] the connection ended with.
//!
//! TLS reasons come from the `rustls::Error` found in the error's source chain. That
//! chain passes through `std::io::Error`, whose `source()` skips the error it wraps
//! (it returns the inner error's source), so the walk looks inside each `io::Error`
//! with `get_ref()` instead.

use std::error::Error as StdError;
use std::io;

use rustls::{AlertDescription, CertificateError, PeerIncompatible};

use super::link::LinkError;
use crate::metrics::UplinkFailure;
use crate::tls::TlsError;

/// Longest source chain followed (the real ones are four or five links long).
const MAX_CHAIN: usize = 16;

/// The reason for `err`. `was_connected`: the broker had accepted the connection
/// (CONNACK) before it ended; then it was lost, whatever the error, unless the uplink
/// ended it for a protocol error.
pub(crate) fn classify(err: &LinkError, was_connected: bool) -> UplinkFailure {
    if let LinkError::Protocol(_) = err {
        return UplinkFailure::Protocol;
    }
    if was_connected {
        return UplinkFailure::Lost;
    }
    if let Some(tls) = rustls_error(err) {
        return from_rustls(tls);
    }
    match err {
        LinkError::Refused(_) => UplinkFailure::Refused,
        LinkError::Unreachable(_) | LinkError::ConnectTimeout => UplinkFailure::Unreachable,
        // The TLS layer failed without a rustls error: the broker closed the
        // connection during the handshake, or the server name is unusable.
        LinkError::Tls(_) => UplinkFailure::TlsOther,
        LinkError::Protocol(_) => UplinkFailure::Protocol,
        LinkError::Io(_) | LinkError::Closed | LinkError::PingTimeout => UplinkFailure::Lost,
    }
}

/// The first `rustls::Error` in `err`'s source chain, looking inside `io::Error`s.
fn rustls_error<'e>(err: &'e (dyn StdError + 'static)) -> Option<&'e rustls::Error> {
    let mut next = Some(err);
    for _ in 0..MAX_CHAIN {
        let current = next?;
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match current.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => current.source(),
        };
    }
    None
}

fn from_rustls(err: &rustls::Error) -> UplinkFailure {
    use CertificateError as C;
    use UplinkFailure as F;
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => F::Expired,
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => F::NotYetValid,
        // BadSignature: a certificate naming our CA as its issuer but not signed by its
        // key (another PKI whose CA has the same name, or a forgery).
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => F::UnknownCa,
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            F::WrongName
        }
        E::InvalidCertificate(C::Other(other))
            if matches!(
                other.0.downcast_ref::<TlsError>(),
                Some(TlsError::PinMismatch)
            ) =>
        {
            F::PinMismatch
        }
        E::PeerIncompatible(
            PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled,
        )
        | E::AlertReceived(AlertDescription::ProtocolVersion) => F::TlsVersion,
        // Alerts a server sends about the certificate the client presented.
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired,
        ) => F::ClientCertRejected,
        _ => F::TlsOther,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rumqttc::mqttbytes::v4::ConnectReturnCode;

    use super::*;

    /// How a failed TLS handshake arrives: the `io::Error` tokio-rustls made of the
    /// rustls error.
    fn handshake_error(err: rustls::Error) -> LinkError {
        LinkError::Tls(io::Error::new(io::ErrorKind::InvalidData, err))
    }

    #[test]
    fn certificate_errors_map_to_their_reasons() {
        let cases = [
            (CertificateError::Expired, UplinkFailure::Expired),
            (CertificateError::NotValidYet, UplinkFailure::NotYetValid),
            (CertificateError::UnknownIssuer, UplinkFailure::UnknownCa),
            (CertificateError::BadSignature, UplinkFailure::UnknownCa),
            (CertificateError::NotValidForName, UplinkFailure::WrongName),
            (CertificateError::InvalidPurpose, UplinkFailure::TlsOther),
        ];
        for (cert, reason) in cases {
            let err = handshake_error(rustls::Error::InvalidCertificate(cert));
            assert_eq!(classify(&err, false), reason);
        }
        let pin = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(TlsError::PinMismatch),
        )));
        assert_eq!(
            classify(&handshake_error(pin), false),
            UplinkFailure::PinMismatch
        );
    }

    #[test]
    fn an_alert_read_after_the_handshake_is_found_in_the_read_error() {
        // TLS 1.3: the broker checks the client certificate after the client finished,
        // so its alert arrives while the CONNACK is read.
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        assert_eq!(
            classify(&LinkError::Io(io), false),
            UplinkFailure::ClientCertRejected
        );
        let version = handshake_error(rustls::Error::AlertReceived(
            AlertDescription::ProtocolVersion,
        ));
        assert_eq!(classify(&version, false), UplinkFailure::TlsVersion);
    }

    #[test]
    fn other_errors_map_by_where_they_happened() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify(&LinkError::Unreachable(refused), false),
            UplinkFailure::Unreachable
        );
        assert_eq!(
            classify(&LinkError::ConnectTimeout, false),
            UplinkFailure::Unreachable
        );
        assert_eq!(
            classify(&LinkError::Refused(ConnectReturnCode::NotAuthorized), false),
            UplinkFailure::Refused
        );
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(
            classify(&LinkError::Tls(eof), false),
            UplinkFailure::TlsOther
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&LinkError::Io(reset), false), UplinkFailure::Lost);
        assert_eq!(
            classify(&LinkError::Protocol("expected CONNACK".into()), false),
            UplinkFailure::Protocol
        );
        assert_eq!(
            classify(&handshake_error(rustls::Error::DecryptError), true),
            UplinkFailure::Lost,
            "after a CONNACK every end is a lost connection"
        );
    }
}
