use super::*;
use ajour_protocol::{Status, UpdateStatus};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn image(version: &str, len: usize) -> FirmwareImage {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    FirmwareImage::new(version, data).unwrap()
}

fn status_at(mtu: Option<u32>, cid: Option<u32>, update: Option<(&str, u32)>) -> Status {
    Status {
        version: b"0.1.0".to_vec(),
        mtu,
        correlation_id: cid,
        update: update.map(|(v, offset)| UpdateStatus {
            version: v.as_bytes().to_vec(),
            offset,
        }),
    }
}

#[test]
fn unavailable_firmware_makes_the_device_wait_with_the_configured_poll() {
    let config = EngineConfig {
        wait_poll: 42,
        ..Default::default()
    };
    let decision = decide(&status_at(None, Some(3), None), Target::Unavailable, &config);
    assert_eq!(
        decision.command,
        Command::Wait {
            correlation_id: Some(3),
            poll: Some(42)
        }
    );
    assert_eq!(decision.outcome, Outcome::Waiting);
}

#[test]
fn device_on_target_version_is_in_sync() {
    let img = image("0.1.0", 100);
    let config = EngineConfig {
        sync_poll: Some(60),
        ..Default::default()
    };
    let decision = decide(&status_at(None, Some(1), None), Target::Ready(&img), &config);
    assert_eq!(
        decision.command,
        Command::Sync {
            version: b"0.1.0",
            correlation_id: Some(1),
            poll: Some(60)
        }
    );
}

#[test]
fn first_status_starts_writing_at_zero_with_default_mtu() {
    let img = image("0.2.0", 2000);
    for mtu in [None, Some(0)] {
        let decision = decide(
            &status_at(mtu, None, None),
            Target::Ready(&img),
            &EngineConfig::default(),
        );
        match decision.command {
            Command::Write {
                offset,
                data,
                version,
                ..
            } => {
                assert_eq!(offset, 0);
                assert_eq!(data.len(), 512, "mtu {mtu:?} uses the default block size");
                assert_eq!(version, b"0.2.0");
                assert_eq!(data, &img.data()[..512]);
            }
            other => panic!("expected Write, got {other:?}"),
        }
    }
}

#[test]
fn mtu_above_maximum_is_clamped() {
    let img = image("0.2.0", 10_000);
    let config = EngineConfig {
        max_mtu: 1024,
        ..Default::default()
    };
    let decision = decide(&status_at(Some(4096), None, None), Target::Ready(&img), &config);
    assert_eq!(
        decision.outcome,
        Outcome::Writing {
            offset: 0,
            len: 1024,
            size: 10_000
        }
    );
}

#[test]
fn continues_from_reported_offset_and_shortens_the_last_block() {
    let img = image("0.2.0", 1000);
    let decision = decide(
        &status_at(Some(512), Some(9), Some(("0.2.0", 512))),
        Target::Ready(&img),
        &EngineConfig::default(),
    );
    match decision.command {
        Command::Write {
            offset,
            data,
            correlation_id,
            ..
        } => {
            assert_eq!((offset, data.len(), correlation_id), (512, 488, Some(9)));
            assert_eq!(data, &img.data()[512..]);
        }
        other => panic!("expected Write, got {other:?}"),
    }
}

#[test]
fn offset_for_another_version_or_past_the_image_restarts_at_zero() {
    let img = image("0.2.0", 1000);
    for update in [("0.1.9", 512), ("0.2.0", 1001), ("0.2.0", u32::MAX)] {
        let decision = decide(
            &status_at(Some(256), None, Some(update)),
            Target::Ready(&img),
            &EngineConfig::default(),
        );
        assert_eq!(
            decision.outcome,
            Outcome::Writing {
                offset: 0,
                len: 256,
                size: 1000
            },
            "update {update:?}"
        );
    }
}

#[test]
fn complete_image_gets_swap_with_sha256() {
    let img = image("0.2.0", 1000);
    let decision = decide(
        &status_at(None, Some(5), Some(("0.2.0", 1000))),
        Target::Ready(&img),
        &EngineConfig::default(),
    );
    let expected: [u8; 32] = Sha256::digest(img.data()).into();
    assert_eq!(
        decision.command,
        Command::Swap {
            version: b"0.2.0",
            correlation_id: Some(5),
            checksum: &expected
        }
    );
}

#[test]
fn empty_image_is_never_swapped_to() {
    let img = image("0.2.0", 0);
    let decision = decide(
        &status_at(None, None, None),
        Target::Ready(&img),
        &EngineConfig::default(),
    );
    assert_eq!(decision.outcome, Outcome::Waiting);
}

#[test]
fn verified_refuses_wrong_size_and_checksum() {
    let data = vec![1u8; 10];
    let sum = hex::encode(Sha256::digest(&data));
    assert!(FirmwareImage::verified("1", data.clone(), 10, &sum).is_ok());
    assert!(FirmwareImage::verified("1", data.clone(), 10, &sum.to_uppercase()).is_ok());
    assert!(matches!(
        FirmwareImage::verified("1", data.clone(), 11, &sum),
        Err(InvalidImage::SizeMismatch {
            declared: 11,
            actual: 10
        })
    ));
    assert!(matches!(
        FirmwareImage::verified("1", data, 10, &"0".repeat(64)),
        Err(InvalidImage::ChecksumMismatch { .. })
    ));
    assert_eq!(FirmwareImage::new("", vec![1]), Err(InvalidImage::EmptyVersion));
}

// A simulated device following these decisions to the end of an update, from any starting point,
// is tested in ajour-sim (`tests/against_engine.rs`).
proptest! {
    #[test]
    fn any_status_gets_a_sane_command(
        version in proptest::collection::vec(any::<u8>(), 0..12),
        mtu in proptest::option::of(any::<u32>()),
        cid in proptest::option::of(any::<u32>()),
        update in proptest::option::of((proptest::collection::vec(any::<u8>(), 0..12), any::<u32>())),
        len in 0usize..3000,
    ) {
        let img = image("1.0.0", len);
        let status = Status {
            version, mtu, correlation_id: cid,
            update: update.map(|(version, offset)| UpdateStatus { version, offset }),
        };
        let decision = decide(&status, Target::Ready(&img), &EngineConfig::default());
        prop_assert_eq!(decision.command.correlation_id(), cid);
        if let Command::Write { offset, data, .. } = decision.command {
            prop_assert!(!data.is_empty());
            prop_assert_eq!(data, img.block(offset, data.len() as u32));
        }
    }
}
