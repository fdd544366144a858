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
}
