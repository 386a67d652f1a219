//! Properties of the codec over arbitrary input: never a panic, and lossless round trips.

use ajour_protocol::*;
use proptest::prelude::*;

fn status() -> impl Strategy<Value = Status> {
    (
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of((proptest::collection::vec(any::<u8>(), 0..40), any::<u32>())),
    )
        .prop_map(|(version, mtu, correlation_id, update)| Status {
            version,
            mtu,
            correlation_id,
            update: update.map(|(version, offset)| UpdateStatus { version, offset }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_status(&bytes);
        let _ = decode_command(&bytes);
    }

    #[test]
    fn mutated_valid_statuses_never_panic(s in status(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut bytes = encode_status(&s, Encoding::Packed);
        for (at, value) in flips {
            let i = at % bytes.len();
            bytes[i] = value;
        }
        let _ = decode_status(&bytes);
        let _ = decode_status(&bytes[..cut % (bytes.len() + 1)]);
    }

    #[test]
    fn statuses_round_trip_in_both_forms(s in status()) {
        prop_assert_eq!(decode_status(&encode_status(&s, Encoding::Packed)).unwrap(), s.clone());
        prop_assert_eq!(decode_status(&encode_status(&s, Encoding::Named)).unwrap(), s);
    }

    #[test]
    fn writes_round_trip(version in proptest::collection::vec(any::<u8>(), 0..20), cid in proptest::option::of(any::<u32>()), offset in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let command = Command::Write { version: &version, correlation_id: cid, offset, data: &data };
        let bytes = encode_command(&command);
        prop_assert_eq!(decode_command(&bytes).unwrap(), command);
    }
}
