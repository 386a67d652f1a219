//! The MQTT endpoint's topics, as Drogue's: a device publishes to `{channel}`, or a gateway to
//! `{channel}/{device}` for a device it acts for; commands arrive on `command/inbox//{command}`
//! (the device's own) or `command/inbox/{device}/{command}` (a device the gateway acts for).
//! Pure rules, no I/O: which topics and filters a client may use, and which filter matches a
//! command's topic.

/// The prefix of every topic commands are published on.
const INBOX: [&str; 2] = ["command", "inbox"];

/// Where a status was published: its channel and, for a gateway, the device it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTopic<'a> {
    pub channel: &'a str,
    pub as_device: Option<&'a str>,
}

/// A topic a client may not publish to, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTopic(pub String);

/// Read a PUBLISH topic: `{channel}` or `{channel}/{device}`, nothing else.
pub fn publish_topic(topic: &str) -> Result<PublishTopic<'_>, InvalidTopic> {
    if topic.contains(['+', '#', '\0']) {
        return Err(InvalidTopic(format!("'{topic}': no wildcards in a topic name")));
    }
    let mut segments = topic.split('/');
    match (segments.next(), segments.next(), segments.next()) {
        (Some(channel), None, None) if !channel.is_empty() => Ok(PublishTopic {
            channel,
            as_device: None,
        }),
        (Some(channel), Some(device), None) if !channel.is_empty() && !device.is_empty() => {
            Ok(PublishTopic {
                channel,
                as_device: Some(device),
            })
        }
        _ => Err(InvalidTopic(format!(
            "'{topic}': publish to {{channel}} or {{channel}}/{{device}}"
        ))),
    }
}

/// The topic a command for a status published to `as_device` (or the device's own) goes out on.
pub fn command_topic(as_device: Option<&str>, command: &str) -> String {
    format!("command/inbox/{}/{command}", as_device.unwrap_or(""))
}

/// What a SUBSCRIBE filter may receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterScope<'a> {
    /// The client's own commands, and those of every device it acts for (`command/inbox/#`,
    /// `command/inbox/+/dfu`, `command/inbox//dfu`...): only ever what it asked for itself.
    Own,
    /// One device's commands (`command/inbox/{device}/...`): allowed when the client is that
    /// device or acts for it.
    Device(&'a str),
}

/// Why a filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterRefusal {
    /// Not a well-formed MQTT filter, or a shared subscription (not offered).
    Invalid(String),
    /// Reaches beyond the command inbox (`#`, `app/...`, `dfu`).
    Outside(String),
}

/// Classify a SUBSCRIBE filter.
pub fn filter_scope(filter: &str) -> Result<FilterScope<'_>, FilterRefusal> {
    if !well_formed(filter) {
        return Err(FilterRefusal::Invalid(format!(
            "'{filter}' is not a valid topic filter"
        )));
    }
    if filter.starts_with("$share/") {
        return Err(FilterRefusal::Invalid(format!(
            "'{filter}': shared subscriptions are not offered here"
        )));
    }
    let segments: Vec<&str> = filter.split('/').collect();
    if segments.len() < 3 || segments[..2] != INBOX {
        return Err(FilterRefusal::Outside(format!(
            "'{filter}': a device receives commands only, on command/inbox/#"
        )));
    }
    Ok(match segments[2] {
        "" | "+" | "#" => FilterScope::Own,
        device => FilterScope::Device(device),
    })
}

/// Whether `filter` is a well-formed MQTT topic filter: `#` only as the whole last level, `+`
/// only as a whole level, no NUL, not empty.
fn well_formed(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| {
        (!level.contains('#') || (*level == "#" && i == levels.len() - 1))
            && (!level.contains('+') || *level == "+")
    })
}

/// Whether a well-formed `filter` matches the topic name `topic` (MQTT's rules: `+` one level,
/// `#` the level above and everything below).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (level, Some(name)) if level == name => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_topics_are_a_channel_and_perhaps_a_device() {
        assert_eq!(
            publish_topic("dfu"),
            Ok(PublishTopic {
                channel: "dfu",
                as_device: None
            })
        );
        assert_eq!(
            publish_topic("dfu/sensor-1"),
            Ok(PublishTopic {
                channel: "dfu",
                as_device: Some("sensor-1")
            })
        );
        for bad in [
            "",
            "/",
            "dfu/",
            "/dfu",
            "dfu/a/b",
            "dfu/+",
            "#",
            "dfu/../../etc/passwd",
        ] {
            assert!(publish_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_reach_the_command_inbox_only() {
        for own in [
            "command/inbox/#",
            "command/inbox/+/dfu",
            "command/inbox//dfu",
            "command/inbox//#",
        ] {
            assert_eq!(filter_scope(own), Ok(FilterScope::Own), "{own}");
        }
        assert_eq!(
            filter_scope("command/inbox/sensor-1/dfu"),
            Ok(FilterScope::Device("sensor-1"))
        );
        for outside in [
            "#",
            "+/inbox/#",
            "command/#",
            "command/inbox",
            "dfu",
            "app/fleet",
            "command/+/x/dfu",
        ] {
            assert!(
                matches!(filter_scope(outside), Err(FilterRefusal::Outside(_))),
                "{outside}"
            );
        }
        for invalid in [
            "",
            "command/inbox/#/dfu",
            "command/inbox/a+/dfu",
            "$share/g/command/inbox/#",
        ] {
            assert!(
                matches!(filter_scope(invalid), Err(FilterRefusal::Invalid(_))),
                "{invalid}"
            );
        }
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        let own = command_topic(None, "dfu");
        assert_eq!(own, "command/inbox//dfu");
        let other = command_topic(Some("sensor-1"), "dfu");
        assert!(matches("command/inbox/#", &own));
        assert!(matches("command/inbox/#", &other));
        assert!(matches("command/inbox/+/dfu", &own));
        assert!(matches("command/inbox//dfu", &own));
        assert!(!matches("command/inbox//dfu", &other));
        assert!(matches("command/inbox/sensor-1/#", &other));
        assert!(!matches("command/inbox/sensor-2/#", &other));
        assert!(!matches("command/inbox/+", &own));
        assert!(matches("command/inbox", "command/inbox"));
        assert!(!matches("command/inbox/+/dfu/x", &own));
    }
}
