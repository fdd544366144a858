//! The checks E3-SPEC "Who checks what" assigns to a gateway, which holds no key: the
//! header parses, the kind is right, the header's device id is the topic's, and the
//! size is within the limit. The payload itself is never looked at.

use e3::{Header, Kind};

use crate::metrics::{DownlinkDrop, Rejection};

/// Checks an uplink envelope that arrived on the uplink topic of `topic_device`.
///
/// # Errors
/// The [`Rejection`] reason.
pub fn check_uplink(topic_device: &str, envelope: &[u8], max_len: usize) -> Result<(), Rejection> {
    if envelope.len() > max_len {
        return Err(Rejection::Oversize);
    }
    let header = Header::parse(envelope).map_err(|_| Rejection::MalformedEnvelope)?;
    if header.kind() != Kind::Uplink {
        return Err(Rejection::WrongKind);
    }
    if header.device_id() != topic_device {
        return Err(Rejection::DeviceMismatch);
    }
    Ok(())
}

/// Checks a command or receipt from the cloud for `topic_device`.
///
/// # Errors
/// [`DownlinkDrop::Invalid`] for any broken rule.
pub fn check_downlink(
    topic_device: &str,
    envelope: &[u8],
    max_len: usize,
) -> Result<(), DownlinkDrop> {
    let header = Header::parse(envelope).map_err(|_| DownlinkDrop::Invalid)?;
    let kind_ok = matches!(header.kind(), Kind::Command | Kind::Receipt);
    if envelope.len() > max_len || !kind_ok || header.device_id() != topic_device {
        return Err(DownlinkDrop::Invalid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use e3::{DeviceId, DeviceKey, Suite};

    fn key(device: &str) -> DeviceKey {
        DeviceKey::new(
            DeviceId::new(device).expect("valid"),
            1,
            Suite::Aes256Gcm,
            [1; 32],
        )
    }

    #[test]
    fn uplink_rules() {
        let up = key("pump-17").seal(Kind::Uplink, 1, b"x").expect("seals");
        assert_eq!(check_uplink("pump-17", &up, 1000), Ok(()));
        assert_eq!(
            check_uplink("meter-9", &up, 1000),
            Err(Rejection::DeviceMismatch)
        );
        assert_eq!(check_uplink("pump-17", &up, 10), Err(Rejection::Oversize));
        assert_eq!(
            check_uplink("pump-17", &up[..20], 1000),
            Err(Rejection::MalformedEnvelope)
        );
        let cmd = key("pump-17").seal(Kind::Command, 1, b"x").expect("seals");
        assert_eq!(
            check_uplink("pump-17", &cmd, 1000),
            Err(Rejection::WrongKind)
        );
    }

    #[test]
    fn downlink_rules() {
        let cmd = key("pump-17").seal(Kind::Command, 1, b"x").expect("seals");
        let receipt = key("pump-17").seal(Kind::Receipt, 1, b"x").expect("seals");
        let up = key("pump-17").seal(Kind::Uplink, 1, b"x").expect("seals");
        assert_eq!(check_downlink("pump-17", &cmd, 1000), Ok(()));
        assert_eq!(check_downlink("pump-17", &receipt, 1000), Ok(()));
        assert_eq!(
            check_downlink("pump-17", &up, 1000),
            Err(DownlinkDrop::Invalid)
        );
        assert_eq!(
            check_downlink("meter-9", &cmd, 1000),
            Err(DownlinkDrop::Invalid)
        );
    }
}
