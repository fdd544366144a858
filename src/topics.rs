//! MQTT topic templates such as `e3/{device_id}/up` or
//! `gw/{gateway_id}/e3/{device_id}/down`: render one for a device, or recognise a
//! concrete topic and extract its device id.

use std::fmt;

use thiserror::Error;

const DEVICE: &str = "{device_id}";
const GATEWAY: &str = "{gateway_id}";

/// Why a template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// `{device_id}` must appear exactly once.
    #[error("topic template must contain {{device_id}} exactly once")]
    DevicePlaceholder,
    /// `{device_id}` must be a whole topic level, so a device id cannot spill over.
    #[error("{{device_id}} must be a whole topic level (between '/' separators)")]
    NotWholeLevel,
    /// MQTT wildcards cannot appear in a topic name.
    #[error("topic template must not contain the wildcards '+' or '#'")]
    Wildcard,
}

/// A validated topic template with the gateway id already filled in.
#[derive(Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    /// As written (placeholders included), for messages and `check-config`.
    template: String,
    prefix: String,
    suffix: String,
}

impl TopicTemplate {
    /// Parses `template`, substituting `{gateway_id}` with `gateway_id`.
    ///
    /// # Errors
    /// A [`TemplateError`] if `{device_id}` is missing, repeated or not a whole level,
    /// or the template has wildcards.
    pub fn new(template: &str, gateway_id: &str) -> Result<Self, TemplateError> {
        if template.contains(['+', '#']) {
            return Err(TemplateError::Wildcard);
        }
        let filled = template.replace(GATEWAY, gateway_id);
        let (prefix, suffix) = filled
            .split_once(DEVICE)
            .ok_or(TemplateError::DevicePlaceholder)?;
        if suffix.contains(DEVICE) {
            return Err(TemplateError::DevicePlaceholder);
        }
        let whole = (prefix.is_empty() || prefix.ends_with('/'))
            && (suffix.is_empty() || suffix.starts_with('/'));
        if !whole {
            return Err(TemplateError::NotWholeLevel);
        }
        Ok(Self {
            template: template.to_owned(),
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// The template as written, placeholders included.
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The topic for `device_id`.
    pub fn render(&self, device_id: &str) -> String {
        let mut topic =
            String::with_capacity(self.prefix.len() + device_id.len() + self.suffix.len());
        topic.push_str(&self.prefix);
        topic.push_str(device_id);
        topic.push_str(&self.suffix);
        topic
    }

    /// A subscription filter matching every device: `{device_id}` becomes `+`.
    pub fn filter(&self) -> String {
        self.render("+")
    }

    /// The device id in `topic`, if `topic` is this template for a valid E3 device id.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let id = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())?;
        e3::header::validate_device_id(id.as_bytes()).ok()
    }
}

impl fmt::Debug for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.template, f)
    }
}

/// A cloud-side template with both placeholders open, e.g.
/// `gw/{gateway_id}/e3/{device_id}/up`: the ingest learns the gateway from the topic.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayTemplate {
    template: String,
    levels: Vec<String>,
}

impl GatewayTemplate {
    /// Parses `template`; each placeholder must be exactly one whole level.
    ///
    /// # Errors
    /// [`TemplateError`] as for [`TopicTemplate::new`].
    pub fn new(template: &str) -> Result<Self, TemplateError> {
        if template.contains(['+', '#']) {
            return Err(TemplateError::Wildcard);
        }
        let levels: Vec<String> = template.split('/').map(str::to_owned).collect();
        let count = |p: &str| levels.iter().filter(|l| *l == p).count();
        let embedded = levels
            .iter()
            .any(|l| l.contains('{') && l != DEVICE && l != GATEWAY);
        if embedded {
            return Err(TemplateError::NotWholeLevel);
        }
        if count(DEVICE) != 1 || count(GATEWAY) != 1 {
            return Err(TemplateError::DevicePlaceholder);
        }
        Ok(Self {
            template: template.to_owned(),
            levels,
        })
    }

    /// `(gateway id, device id)` if `topic` matches and both are valid ids.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.len() != self.levels.len() {
            return None;
        }
        let (mut gateway, mut device) = (None, None);
        for (level, part) in self.levels.iter().zip(parts) {
            match level.as_str() {
                GATEWAY => gateway = Some(part),
                DEVICE => device = Some(part),
                fixed if fixed != part => return None,
                _ => {}
            }
        }
        let valid = |id: &'t str| e3::header::validate_device_id(id.as_bytes()).ok();
        Some((valid(gateway?)?, valid(device?)?))
    }

    /// The topic for `gateway` and `device`.
    pub fn render(&self, gateway: &str, device: &str) -> String {
        self.template
            .replace(GATEWAY, gateway)
            .replace(DEVICE, device)
    }

    /// A filter matching every gateway and device.
    pub fn filter(&self) -> String {
        self.render("+", "+")
    }
}

impl fmt::Debug for GatewayTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.template, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_recognises() {
        let t = TopicTemplate::new("gw/{gateway_id}/e3/{device_id}/down", "gw-1").expect("ok");
        assert_eq!(t.render("pump-17"), "gw/gw-1/e3/pump-17/down");
        assert_eq!(t.filter(), "gw/gw-1/e3/+/down");
        assert_eq!(t.device_of("gw/gw-1/e3/pump-17/down"), Some("pump-17"));
        assert_eq!(t.device_of("gw/gw-2/e3/pump-17/down"), None);
        assert_eq!(t.device_of("gw/gw-1/e3/a/b/down"), None);
        assert_eq!(t.device_of("gw/gw-1/e3//down"), None);
    }

    #[test]
    fn rejects_bad_templates() {
        assert_eq!(
            TopicTemplate::new("e3/up", "g"),
            Err(TemplateError::DevicePlaceholder)
        );
        assert_eq!(
            TopicTemplate::new("e3/{device_id}/{device_id}", "g"),
            Err(TemplateError::DevicePlaceholder)
        );
        assert_eq!(
            TopicTemplate::new("e3/x{device_id}/up", "g"),
            Err(TemplateError::NotWholeLevel)
        );
        assert_eq!(
            TopicTemplate::new("e3/+/{device_id}", "g"),
            Err(TemplateError::Wildcard)
        );
        assert!(TopicTemplate::new("{device_id}", "g").is_ok());
    }

    #[test]
    fn gateway_templates_extract_both_ids() {
        let t = GatewayTemplate::new("gw/{gateway_id}/e3/{device_id}/up").expect("ok");
        assert_eq!(t.parse("gw/gw-1/e3/pump-17/up"), Some(("gw-1", "pump-17")));
        assert_eq!(t.parse("gw/gw-1/e3/pump-17/down"), None);
        assert_eq!(t.parse("gw/gw 1/e3/pump-17/up"), None);
        assert_eq!(t.render("gw-2", "d"), "gw/gw-2/e3/d/up");
        assert_eq!(t.filter(), "gw/+/e3/+/up");
        assert!(GatewayTemplate::new("gw/{device_id}/up").is_err());
    }
}
