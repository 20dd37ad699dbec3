//! Captured-shape gateway messages and helpers shared by the tests.
use crate::compress::Compressor;
use crate::inflate::{Compression, Transport};

/// HELLO as Discord sends it: key order t, s, op, d and an undocumented `_trace`.
pub const HELLO: &[u8] = br#"{"t":null,"s":null,"op":10,"d":{"heartbeat_interval":41250,"_trace":["[\"gateway-prd-us-east1-b-0568\",{\"micros\":0.0}]"]}}"#;

/// The 36-byte heartbeat ACK.
pub const ACK: &[u8] = br#"{"t":null,"s":null,"op":11,"d":null}"#;

/// READY with unavailable guilds, escaped strings and nested `id`s before `guilds`.
pub const READY: &[u8] = br#"{"t":"READY","s":1,"op":0,"d":{"v":10,"user_settings":{},"user":{"verified":true,"username":"Caf\u00e9 \ud83e\udd16 bot","id":"1100000000000000001","global_name":null,"flags":0,"discriminator":"0","bot":true,"avatar":null},"shard":[0,1],"session_type":"normal","session_id":"9f2c8b1e7d\u00e9\"x\\y","resume_gateway_url":"wss:\/\/gateway-us-east1-c.discord.gg","relationships":[],"private_channels":[],"presences":[],"guilds":[{"unavailable":true,"id":"81384788765712384"},{"id":"613425648685547541","unavailable":true}],"guild_join_requests":[],"geo_ordered_rtc_regions":["us-east","us-central"],"application":{"id":"1100000000000000001","flags":8953856},"_trace":["[\"gateway-prd-us-east1-c-7f0x\",{\"micros\":107093,\"calls\":[\"id_created\",{\"micros\":1117,\"calls\":[]}]}]"]}}"#;

/// RESUMED.
pub const RESUMED: &[u8] = br#"{"t":"RESUMED","s":42,"op":0,"d":{"_trace":["[\"gateway-prd-us-east1-c-7f0x\",{\"micros\":1432}]"]}}"#;

/// INVALID_SESSION (not resumable).
pub const INVALID_SESSION: &[u8] = br#"{"t":null,"s":null,"op":9,"d":false}"#;

/// RECONNECT.
pub const RECONNECT: &[u8] = br#"{"t":null,"s":null,"op":7,"d":null}"#;

/// GUILD_CREATE with channels and members whose `id`s come before the guild's own.
pub const GUILD_CREATE: &[u8] = br#"{"t":"GUILD_CREATE","s":3,"op":0,"d":{"channels":[{"id":"81384788765712385","type":0,"name":"general","topic":"say \"op\":7 here ]}"},{"id":"81384788765712386","type":2,"name":"voice [1]"}],"members":[{"user":{"id":"53908232506183680","username":"Mason"},"roles":[],"joined_at":"2015-04-26T06:26:56.936000+00:00"}],"member_count":2,"large":false,"op":9,"t":"FAKE","unavailable":false,"name":"Discord API \\ test","id":"81384788765712384","emojis":[],"roles":[{"id":"81384788765712384","name":"@everyone","permissions":"104324161"}]}}"#;

/// GUILD_DELETE of an outage (unavailable) guild.
pub const GUILD_DELETE: &[u8] =
    br#"{"t":"GUILD_DELETE","s":7,"op":0,"d":{"unavailable":true,"id":"613425648685547541"}}"#;

/// MESSAGE_CREATE whose content imitates envelope keys.
pub const MESSAGE_CREATE: &[u8] = br#"{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{"type":0,"tts":false,"timestamp":"2026-01-01T00:00:00.117000+00:00","pinned":false,"nonce":"1456074443961211714","mentions":[],"member":{"roles":["786674882190508751"],"nick":"Xan","joined_at":"2024-03-15T14:11:29.061000+00:00","flags":10},"id":"1456074444472168448","flags":0,"embeds":[],"edited_timestamp":null,"content":"look {\"op\":7,\"t\":\"X\",\"d\":{}} https:\/\/example.com \u00e9","components":[],"channel_id":"801022456441209866","author":{"username":"luxtao917","id":"1178334848277285228","global_name":"Luxtao917"},"attachments":[],"guild_id":"1030189824911295867"}}"#;

/// The embed unfurl of [`MESSAGE_CREATE`]: same content, same `edited_timestamp`.
pub const MESSAGE_UNFURL: &[u8] = br#"{"t":"MESSAGE_UPDATE","s":5,"op":0,"d":{"type":0,"id":"1456074444472168448","embeds":[{"type":"link","url":"https://example.com","title":"Example"}],"edited_timestamp":null,"content":"look {\"op\":7,\"t\":\"X\",\"d\":{}} https:\/\/example.com \u00e9","channel_id":"801022456441209866","author":{"id":"1178334848277285228"},"guild_id":"1030189824911295867"}}"#;

/// A real edit of [`MESSAGE_CREATE`].
pub const MESSAGE_EDIT: &[u8] = br#"{"t":"MESSAGE_UPDATE","s":6,"op":0,"d":{"type":0,"id":"1456074444472168448","embeds":[],"edited_timestamp":"2026-01-01T00:01:00.000000+00:00","content":"look, edited","channel_id":"801022456441209866","guild_id":"1030189824911295867"}}"#;

/// MESSAGE_DELETE of [`MESSAGE_CREATE`].
pub const MESSAGE_DELETE: &[u8] = br#"{"t":"MESSAGE_DELETE","s":8,"op":0,"d":{"id":"1456074444472168448","channel_id":"801022456441209866","guild_id":"1030189824911295867"}}"#;

/// A dispatch the codec does not need to understand.
pub const PRESENCE_UPDATE: &[u8] = br#"{"t":"PRESENCE_UPDATE","s":9,"op":0,"d":{"user":{"id":"1062483858459069844"},"status":"online","guild_id":"1030191098277861744","client_status":{"mobile":"online"},"activities":[{"name":"Custom Status","state":"\u2728 [brackets] {braces} \\\" tricky","type":4}]}}"#;

/// Every fixture, in a plausible stream order.
pub const ALL: &[&[u8]] = &[
    HELLO,
    READY,
    GUILD_CREATE,
    MESSAGE_CREATE,
    ACK,
    MESSAGE_UNFURL,
    MESSAGE_EDIT,
    PRESENCE_UPDATE,
    MESSAGE_DELETE,
    GUILD_DELETE,
    RECONNECT,
    RESUMED,
    INVALID_SESSION,
];

/// Compresses `messages` on one stream, one output per message.
pub fn compress_all(kind: Compression, messages: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut c = Compressor::new(kind, 6).unwrap();
    messages.iter().map(|m| c.compress(m).unwrap()).collect()
}

/// Feeds `frames` (with their fin bits) and collects the completed messages.
pub fn feed_frames(t: &mut Transport, frames: &[(&[u8], bool)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut done = Vec::new();
    for &(f, fin) in frames {
        if t.feed(f, fin, &mut out, 0).unwrap() {
            done.push(std::mem::take(&mut out));
        }
    }
    assert!(
        out.is_empty(),
        "left a partial message: {} bytes",
        out.len()
    );
    done
}
