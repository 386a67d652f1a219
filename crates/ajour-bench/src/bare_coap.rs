//! The minimal CoAP server: the least a server must do per block over CoAP (RFC 7252), as the
//! baseline of `ajour-bench coap`. It shares no code with Ajour: `coap-lite` for the message
//! format and the baselines' own wire ([`crate::bare_wire`]). One UDP socket, one loop: each
//! datagram is parsed, its payload taken as a status, the command sliced from the image in memory
//! and sent back in a piggybacked ACK (2.05, option 4210 `dfu`). Nothing else: no credentials
//! (option 4209 is not read), no duplicate cache, no registry, no status tracking, no metrics.

use crate::bare::BareServerArgs;
use crate::bare_wire::{answer, Image};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

/// A UDP socket on `listen` with a 4 MiB receive buffer, as Ajour's endpoint asks for: with the
/// default, a thousand devices' requests arriving at once overflow it, and each datagram dropped
/// costs its device a 2 s retransmission, which would measure the kernel's buffer, not the server.
fn bind(listen: &str) -> anyhow::Result<tokio::net::UdpSocket> {
    let addr: std::net::SocketAddr = listen.parse()?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(tokio::net::UdpSocket::from_std(socket.into())?)
}

/// Drogue's option carrying the command's name.
const COMMAND_OPTION: u16 = 4210;
/// The largest datagram read.
const MAX_DATAGRAM: usize = 64 * 1024;

pub async fn serve(args: BareServerArgs) -> anyhow::Result<()> {
    let image = Image::new(args.version, crate::fleet::bench_image(args.image_size));
    let socket = bind(&args.listen)?;
    println!("bare CoAP endpoint listening on coap://{}", socket.local_addr()?);
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        let (len, peer) = socket.recv_from(&mut buffer).await?;
        let Ok(request) = Packet::from_bytes(&buffer[..len]) else {
            continue;
        };
        let Some(command) = answer(&image, &request.payload) else {
            continue;
        };
        let mut response = Packet::new();
        response.header.set_type(match request.header.get_type() {
            MessageType::Confirmable => MessageType::Acknowledgement,
            _ => MessageType::NonConfirmable,
        });
        response.header.message_id = request.header.message_id;
        response.header.code = MessageClass::Response(ResponseType::Content);
        response.set_token(request.get_token().to_vec());
        response.add_option(CoapOption::Unknown(COMMAND_OPTION), b"dfu".to_vec());
        response.payload = command;
        if let Ok(bytes) = response.to_bytes_unlimited() {
            // A datagram lost here is one the device sends again, as it would be on a network.
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}
