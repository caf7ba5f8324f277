#!/usr/bin/env bash
# make_audio_fixtures.sh - regenerate the small audio test fixtures in audio_fixtures/.
#
# Needs (Debian/Ubuntu):
#   apt-get install espeak-ng sox libsox-fmt-all vorbis-tools ffmpeg python3
#   (flite is not used; python3 needs only its standard library.)
#
# Makes (run from the repo root: `bash tools/make_audio_fixtures.sh`):
#   audio_fixtures/*.wav|flac|mp3|ogg   good files; each name states its exact format:
#                                       <content>-<rate>-<channels>-<sampleformat>[-<extra>].<ext>
#                                       content "speech" = espeak-ng saying "the quick brown fox",
#                                       content "sine1k" = exact 1 kHz sine, amplitude 0.5, 1.0 s.
#   audio_fixtures/broken/*             files that a decoder / loader must reject.
#   audio_fixtures/README.md            table of every good file (measured with ffprobe).
#   audio_fixtures/broken/README.md     one line per broken file: what is wrong, expected error.
#
# The script owns audio_fixtures/ entirely: it deletes and recreates it on every run.
# Output is deterministic for a given tool version (no dither: sox -D, repeatable: sox -R,
# fixed ogg serial numbers, ffmpeg bitexact, fixed PRNG seeds).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in espeak-ng sox ffmpeg ffprobe oggenc python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found (see header)" >&2; exit 1; }
done
SOX_FORMATS=$(sox -h | grep 'AUDIO FILE FORMATS:')
for fmt in flac mp3 gsm; do
    [[ " $SOX_FORMATS " == *" $fmt "* ]] || { echo "error: sox lacks $fmt (libsox-fmt-all)" >&2; exit 1; }
done

OUT=audio_fixtures
BROKEN=$OUT/broken
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Only this script's own files: audio_fixtures/kws and audio_fixtures/asr belong to
# tools/make_demo_data.py.
find "$OUT" -maxdepth 1 -type f -delete 2>/dev/null || true
rm -rf "$OUT/broken"
mkdir -p "$OUT" "$BROKEN"

SOX=(sox -D -R -V1)                     # no dither, repeatable, errors only
FF=(ffmpeg -nostdin -hide_banner -v error -y)
FFX=(-fflags +bitexact -flags:a +bitexact -map_metadata -1)
TEXT="the quick brown fox"

# --------------------------------------------------------------------------------------------
# 1. Base speech clips: 22050 Hz mono s16 from espeak-ng, silence trimmed, peak-normalised to
#    -3 dBFS so that resampling never clips.
# --------------------------------------------------------------------------------------------
speak() { # speak VOICE NAME
    espeak-ng -v "$1" -w "$TMP/raw-$2.wav" "$TEXT"
    "${SOX[@]}" "$TMP/raw-$2.wav" "$TMP/$2.wav" \
        silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse gain -n -3
}
speak en-us+f3 us          # female US
speak en-gb+m3 gb          # male GB
speak en-gb-scotland sc    # Scottish

# Stereo = L: speech, R: the same speech x0.5 (-6.02 dB). Quad = gains 1, 0.5, 0.25, 0.125.
ST=(remix 1 1v0.5)
QUAD=(remix 1 1v0.5 1v0.25 1v0.125)

# --------------------------------------------------------------------------------------------
# 2. WAV speech. `-t wavpcm` keeps the plain WAVE_FORMAT_PCM (1) header for 24/32-bit ints;
#    sox writes WAVE_FORMAT_IEEE_FLOAT (3) for floats and WAVE_FORMAT_EXTENSIBLE (0xFFFE) with
#    `-t wav` for >16 bit or >2 channels.
# --------------------------------------------------------------------------------------------
# 16 kHz master in s16: the f32 / f64 / FLAC 16 kHz files hold exactly these sample values.
"${SOX[@]}" "$TMP/us.wav" -r 16000 -b 16 -e signed-integer "$TMP/us16.wav"

"${SOX[@]}" "$TMP/gb.wav" -r 8000 -b 8 -e unsigned-integer -t wavpcm "$OUT/speech-8k-mono-u8.wav"
"${SOX[@]}" "$TMP/us16.wav" -b 16 -e signed-integer -t wavpcm "$OUT/speech-16k-mono-s16.wav"
"${SOX[@]}" "$TMP/sc.wav" -r 22050 -b 24 -e signed-integer -t wavpcm "$OUT/speech-22k05-mono-s24.wav"
"${SOX[@]}" "$TMP/us.wav" -r 48000 -b 32 -e signed-integer -t wavpcm \
    "$OUT/speech-48k-stereo-s32.wav" "${ST[@]}" trim 0 0.35
"${SOX[@]}" "$TMP/us16.wav" -b 32 -e floating-point -t wavpcm "$OUT/speech-16k-mono-f32.wav"
"${SOX[@]}" "$TMP/us16.wav" -b 64 -e floating-point -t wavpcm "$OUT/speech-16k-mono-f64.wav"
"${SOX[@]}" "$TMP/gb.wav" -r 48000 -b 24 -e signed-integer -t wav \
    "$OUT/speech-48k-stereo-s24-extensible.wav" "${ST[@]}" trim 0 0.4
"${SOX[@]}" "$TMP/sc.wav" -r 44100 -b 16 -e signed-integer -t wav \
    "$OUT/speech-44k1-quad-s16-extensible.wav" "${QUAD[@]}" trim 0 0.35

# --------------------------------------------------------------------------------------------
# 3. FLAC speech (-C 8 = best compression).
# --------------------------------------------------------------------------------------------
"${SOX[@]}" "$TMP/us16.wav" -C 8 "$OUT/speech-16k-mono-s16.flac"
"${SOX[@]}" "$TMP/gb.wav" -r 44100 -b 16 -C 8 "$OUT/speech-44k1-stereo-s16.flac" "${ST[@]}"
"${SOX[@]}" "$TMP/us.wav" -r 48000 -b 24 -C 8 "$OUT/speech-48k-stereo-s24.flac" "${ST[@]}" trim 0 1.0
"${SOX[@]}" "$TMP/sc.wav" -r 22050 -b 16 -C 8 "$OUT/speech-22k05-mono-s16.flac"

# --------------------------------------------------------------------------------------------
# 4. MP3 (ffmpeg + libmp3lame, CBR, with Xing/LAME "Info" header) and Ogg Vorbis (oggenc).
# --------------------------------------------------------------------------------------------
"${SOX[@]}" "$TMP/gb.wav" -r 44100 -b 16 "$TMP/gb44st.wav" "${ST[@]}"
"${SOX[@]}" "$TMP/sc.wav" -r 44100 -b 16 "$TMP/sc44st.wav" "${ST[@]}"
"${FF[@]}" -i "$TMP/us16.wav" -c:a libmp3lame -b:a 32k "${FFX[@]}" "$OUT/speech-16k-mono.mp3"
"${FF[@]}" -i "$TMP/gb44st.wav" -c:a libmp3lame -b:a 64k "${FFX[@]}" "$OUT/speech-44k1-stereo.mp3"
oggenc -Q -q 2 -s 1 -o "$OUT/speech-16k-mono-vorbis.ogg" "$TMP/us16.wav"
oggenc -Q -q 2 -s 2 -o "$OUT/speech-44k1-stereo-vorbis.ogg" "$TMP/sc44st.wav"

# --------------------------------------------------------------------------------------------
# 5. Sines, written sample-exactly with python:
#    s16 = round(16384 * sin(2*pi*1000*n/rate))  (16384/32768 = 0.5 exactly)
#    f32 = float32(0.5 * sin(2*pi*1000*n/rate))
#    1.0 s = exactly `rate` frames.
# 6. Broken files.
# 7. MP3 with garbage in the middle.
# --------------------------------------------------------------------------------------------
python3 - "$OUT" "$BROKEN" "$TMP" <<'PY'
import math, random, struct, sys, zlib

out, broken, tmp = sys.argv[1:4]

def wav_bytes(rate, channels, bits, fmt_tag, data, data_len=None, riff_len=None):
    """Plain RIFF/WAVE. fmt_tag 1 = PCM (16-byte fmt), 3 = IEEE float (18-byte fmt + fact)."""
    block_align = channels * bits // 8
    if fmt_tag == 1:
        fmt = struct.pack('<HHIIHH', 1, channels, rate, rate * block_align, block_align, bits)
        extra = b''
    else:
        fmt = struct.pack('<HHIIHHH', 3, channels, rate, rate * block_align, block_align, bits, 0)
        n_frames = (data_len if data_len is not None else len(data)) // block_align
        extra = b'fact' + struct.pack('<II', 4, n_frames)
    if data_len is None:
        data_len = len(data)
    body = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + extra \
        + b'data' + struct.pack('<I', data_len) + data
    if riff_len is None:
        riff_len = 4 + len(body) - 4 - len(data) + data_len  # as if the data were complete
    if len(data) % 2 and len(data) == data_len:
        body += b'\0'
        riff_len += 1
    return b'RIFF' + struct.pack('<I', riff_len) + body

def write(path, b):
    with open(path, 'wb') as f:
        f.write(b)

def sine_s16(rate, n):
    return [round(16384 * math.sin(2 * math.pi * 1000 * i / rate)) for i in range(n)]

def sine_f(rate, n, amp=0.5):
    return [amp * math.sin(2 * math.pi * 1000 * i / rate) for i in range(n)]

def s16(vals):
    return struct.pack('<%dh' % len(vals), *vals)

def f32(vals):
    return struct.pack('<%df' % len(vals), *vals)

# ---- sines
write(f'{out}/sine1k-8k-mono-s16.wav', wav_bytes(8000, 1, 16, 1, s16(sine_s16(8000, 8000))))
write(f'{out}/sine1k-22k05-mono-f32.wav', wav_bytes(22050, 1, 32, 3, f32(sine_f(22050, 22050))))
write(f'{tmp}/sine1k-44k1-mono-s16.wav', wav_bytes(44100, 1, 16, 1, s16(sine_s16(44100, 44100))))
st = [v for v in sine_s16(48000, 48000) for _ in (0, 1)]
write(f'{out}/sine1k-48k-stereo-s16.wav', wav_bytes(48000, 2, 16, 1, s16(st)))

# ---- broken
open(f'{broken}/empty.wav', 'wb').close()

random.seed(1)
write(f'{broken}/random-bytes.wav', bytes(random.getrandbits(8) for _ in range(4096)))

def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
raw = b''.join(b'\0' + bytes([255, 0, 0, 0, 0, 255]) for _ in range(2))  # 2x2 RGB
png = b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', 2, 2, 8, 2, 0, 0, 0)) \
    + png_chunk(b'IDAT', zlib.compress(raw, 9)) + png_chunk(b'IEND', b'')
write(f'{broken}/png-named.wav', png)

with open(f'{out}/speech-16k-mono-s16.wav', 'rb') as f:
    write(f'{broken}/truncated-header.wav', f.read(20))

snippet = s16([v // 2 for v in sine_s16(16000, 50)])  # 100 bytes = 50 samples
write(f'{broken}/data-overpromise.wav', wav_bytes(16000, 1, 16, 1, snippet, data_len=1_000_000))
write(f'{broken}/data-overpromise-empty.wav', wav_bytes(16000, 1, 16, 1, b'', data_len=1_000_000))
write(f'{broken}/zero-samples.wav', wav_bytes(16000, 1, 16, 1, b''))

base = sine_f(16000, 1600, amp=0.25)
nan = list(base)
for i in (100, 101, 800, 1599):
    nan[i] = float('nan')
write(f'{broken}/nan-f32.wav', wav_bytes(16000, 1, 32, 3, f32(nan)))
inf = list(base)
for i, v in ((100, math.inf), (800, -math.inf), (1599, math.inf)):
    inf[i] = v
write(f'{broken}/inf-f32.wav', wav_bytes(16000, 1, 32, 3, f32(inf)))

pcm = s16([v // 2 for v in sine_s16(16000, 1600)])
write(f'{broken}/rate-0.wav', wav_bytes(0, 1, 16, 1, pcm))
write(f'{broken}/rate-2mhz.wav', wav_bytes(2_000_000, 1, 16, 1, pcm))

write(f'{broken}/text-named.flac',
      b'This is a plain text file, not FLAC audio.\n'
      b'It exists to check that a decoder rejects it instead of trusting the extension.\n')

# ---- mp3 with garbage over the middle frames (MPEG-1 Layer III only)
with open(f'{out}/speech-44k1-stereo.mp3', 'rb') as f:
    mp3 = bytearray(f.read())
pos = 0
if mp3[:3] == b'ID3':
    sz = mp3[6:10]
    pos = 10 + ((sz[0] << 21) | (sz[1] << 14) | (sz[2] << 7) | sz[3])
BITRATES = [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320]
RATES = [44100, 48000, 32000]
frames = []
while pos + 4 <= len(mp3):
    h = struct.unpack('>I', mp3[pos:pos + 4])[0]
    assert (h >> 21) == 0x7FF and ((h >> 19) & 3) == 3 and ((h >> 17) & 3) == 1, hex(pos)
    size = 144000 * BITRATES[(h >> 12) & 15] // RATES[(h >> 10) & 3] + ((h >> 9) & 1)
    frames.append((pos, size))
    pos += size
assert len(frames) > 20, len(frames)
k = len(frames) // 2
start = frames[k][0] + frames[k][1] // 2       # second half of frame k ...
end = frames[k + 3][0]                         # ... and all of frames k+1, k+2
random.seed(1)
mp3[start:end] = bytes(random.randrange(0xFF) for _ in range(end - start))  # no 0xFF: no fake sync
write(f'{out}/speech-44k1-stereo-corrupt-middle.mp3', bytes(mp3))
with open(f'{tmp}/corrupt-info.txt', 'w') as f:
    f.write(f'{end - start} garbage bytes at offsets {start}..{end} '
            f'(second half of frame {k} and frames {k + 1}-{k + 2} of {len(frames)})\n')
PY

"${SOX[@]}" "$TMP/sine1k-44k1-mono-s16.wav" -C 8 "$OUT/sine1k-44k1-mono-s16.flac"

# Codecs that the toolkit does not decode.
"${FF[@]}" -i "$TMP/us16.wav" -c:a libopus -b:a 24k "${FFX[@]}" -f ogg \
    "$BROKEN/unsupported-codec-opus.ogg"
"${SOX[@]}" "$TMP/us16.wav" -r 8000 -e gsm-full-rate -t wav "$BROKEN/unsupported-codec-gsm.wav"

# --------------------------------------------------------------------------------------------
# 8. Verify the WAV format tags match the names, and that the damaged MP3 still decodes > 1 s.
# --------------------------------------------------------------------------------------------
python3 - "$OUT" <<'PY'
import glob, os, struct, sys
out = sys.argv[1]
for p in sorted(glob.glob(f'{out}/*.wav')):
    d = open(p, 'rb').read(64)
    assert d[:4] == b'RIFF' and d[8:16] == b'WAVEfmt ', p
    tag = struct.unpack('<H', d[20:22])[0]
    name = os.path.basename(p)
    want = 0xFFFE if '-extensible' in name else (3 if ('-f32' in name or '-f64' in name) else 1)
    if tag != want:
        sys.exit(f'{p}: format tag {tag:#x}, expected {want:#x}')
# symphonia 0.5.5 probes by scanning the content for these markers (ADTS, MPEG audio sync
# words, containers, ID3v2); the junk files must contain none of them.
markers = [b'RIFF', b'OggS', b'fLaC', b'ID3', b'FORM', b'caff', b'ftyp', b'\x1a\x45\xdf\xa3'] \
    + [bytes([0xFF, b]) for b in (0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xF1, 0xF2, 0xF3, 0xF4,
                                   0xF5, 0xF6, 0xF7, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF)]
for name in ('random-bytes.wav', 'png-named.wav', 'text-named.flac'):
    d = open(f'{out}/broken/{name}', 'rb').read()
    hit = [m for m in markers if m in d]
    if hit:
        sys.exit(f'{name}: contains probe marker(s) {hit}')
PY
decoded=$(ffmpeg -nostdin -v quiet -i "$OUT/speech-44k1-stereo-corrupt-middle.mp3" -f s16le -ac 1 - | wc -c)
python3 -c "import sys; n=int(sys.argv[1])/2/44100; assert n > 1.0, n" "$decoded"

# --------------------------------------------------------------------------------------------
# 9. READMEs.
# --------------------------------------------------------------------------------------------
CORRUPT_INFO=$(cat "$TMP/corrupt-info.txt")
python3 - "$OUT" "$CORRUPT_INFO" <<'PY'
import glob, json, os, struct, subprocess, sys
out, corrupt_info = sys.argv[1:3]

NOTES = {
    'speech-8k-mono-u8.wav': 'en-gb+m3',
    'speech-16k-mono-s16.wav': 'en-us+f3; the 16 kHz reference: same samples as the f32/f64/FLAC 16k files',
    'speech-22k05-mono-s24.wav': 'en-gb-scotland; plain WAVE_FORMAT_PCM header with 24 bit',
    'speech-48k-stereo-s32.wav': 'en-us+f3, 0.35 s; R = 0.5 x L; plain WAVE_FORMAT_PCM header with 32 bit',
    'speech-16k-mono-f32.wav': 'en-us+f3; values = speech-16k-mono-s16.wav / 32768 exactly',
    'speech-16k-mono-f64.wav': 'en-us+f3; values = speech-16k-mono-s16.wav / 32768 exactly',
    'speech-48k-stereo-s24-extensible.wav': 'en-gb+m3, 0.4 s; R = 0.5 x L; WAVE_FORMAT_EXTENSIBLE, mask 0x3, PCM GUID',
    'speech-44k1-quad-s16-extensible.wav': 'en-gb-scotland, 0.35 s; channel gains 1, 0.5, 0.25, 0.125; WAVE_FORMAT_EXTENSIBLE, mask 0x33',
    'speech-16k-mono-s16.flac': 'en-us+f3; lossless copy of speech-16k-mono-s16.wav',
    'speech-44k1-stereo-s16.flac': 'en-gb+m3; R = 0.5 x L',
    'speech-48k-stereo-s24.flac': 'en-us+f3, first 1.0 s; R = 0.5 x L',
    'speech-22k05-mono-s16.flac': 'en-gb-scotland',
    'speech-16k-mono.mp3': 'en-us+f3; MPEG-2 Layer III 32 kb/s CBR, ID3v2 + LAME Info header',
    'speech-44k1-stereo.mp3': 'en-gb+m3; R = 0.5 x L; MPEG-1 Layer III 64 kb/s CBR, ID3v2 + LAME Info header',
    'speech-44k1-stereo-corrupt-middle.mp3': 'copy of speech-44k1-stereo.mp3 with ' + corrupt_info.strip()
        + '; garbage has no 0xFF bytes; must still decode (skip bad packets)',
    'speech-16k-mono-vorbis.ogg': 'en-us+f3; oggenc -q 2',
    'speech-44k1-stereo-vorbis.ogg': 'en-gb-scotland; R = 0.5 x L; oggenc -q 2',
    'sine1k-8k-mono-s16.wav': '1 kHz, amplitude 0.5 (s16 peak 16384), exactly 8000 frames',
    'sine1k-22k05-mono-f32.wav': '1 kHz, amplitude 0.5, exactly 22050 frames',
    'sine1k-44k1-mono-s16.flac': '1 kHz, amplitude 0.5 (s16 peak 16384), exactly 44100 frames',
    'sine1k-48k-stereo-s16.wav': '1 kHz, amplitude 0.5, both channels identical, exactly 48000 frames',
}

def probe(p):
    j = json.loads(subprocess.check_output(
        ['ffprobe', '-v', 'error', '-show_streams', '-show_format', '-of', 'json', p]))
    return j['streams'][0], j['format']

def wav_tag(p):
    d = open(p, 'rb').read(22)
    return {1: 'PCM (0x0001)', 3: 'IEEE float (0x0003)', 0xFFFE: 'EXTENSIBLE (0xFFFE)'}.get(
        struct.unpack('<H', d[20:22])[0], '?')

rows = []
files = sorted(f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)) and f != 'README.md')
assert set(files) == set(NOTES), set(files) ^ set(NOTES)
order = {'.wav': 0, '.flac': 1, '.mp3': 2, '.ogg': 3}
files.sort(key=lambda f: (f.startswith('sine'), order[os.path.splitext(f)[1]], f))
for f in files:
    p = os.path.join(out, f)
    s, fm = probe(p)
    ext = os.path.splitext(f)[1]
    codec = s['codec_name']
    if ext == '.wav':
        container, codec = 'WAV, ' + wav_tag(p), codec
        sfmt = {'pcm_u8': 'u8', 'pcm_s16le': 's16', 'pcm_s24le': 's24', 'pcm_s32le': 's32',
                'pcm_f32le': 'f32', 'pcm_f64le': 'f64'}[codec]
    elif ext == '.flac':
        container, sfmt = 'FLAC', 's%s' % s.get('bits_per_raw_sample')
    elif ext == '.mp3':
        container, sfmt = 'MP3', '(lossy)'
    else:
        container, sfmt = 'Ogg', '(lossy)'
    rows.append('| `%s` | %s | %s | %s | %s | %s | %.3f s | %d | %s |' % (
        f, container, codec, s['sample_rate'], s['channels'], sfmt, float(fm['duration']),
        os.path.getsize(p), NOTES[f]))

broken = sorted(os.listdir(os.path.join(out, 'broken')))
with open(os.path.join(out, 'README.md'), 'w') as fh:
    fh.write('''# Audio fixtures

Generated by `tools/make_audio_fixtures.sh` (run from the repo root; it deletes and recreates
this folder). Do not edit by hand.

File names state the exact format: `<content>-<rate>-<channels>-<sampleformat>[-<extra>].<ext>`
(rates `8k`, `16k`, `22k05`, `44k1`, `48k`; sample formats `u8`, `s16`, `s24`, `s32`, `f32`, `f64`).

* `speech` = espeak-ng saying "the quick brown fox" (voice in the notes), silence-trimmed and
  normalised to -3 dBFS peak, resampled with sox (no dither).
  Stereo files: left = speech, right = the same speech times 0.5 (-6 dB), so a mono mix
  (0.75 x left) is distinguishable from channel 0.
* `sine1k` = exact 1 kHz sine, amplitude 0.5, exactly 1.0 s, written sample by sample
  (s16 value = round(16384 * sin(2 pi 1000 n / rate)), f32 = 0.5 * sin(...)).
* Durations are from ffprobe. For MP3 that is frames x samples-per-frame from the LAME Info
  header, i.e. including encoder delay + padding (a gapless-aware decoder returns about 1105
  fewer samples); for the corrupt MP3 it is the undamaged file's length, less decodes.

| file | container | codec | rate | ch | sample format | duration | bytes | notes |
|---|---|---|---|---|---|---|---|---|
''')
    fh.write('\n'.join(rows) + '\n')
    fh.write('\n## broken/\n\nFiles every loader must reject; see `broken/README.md` for what is wrong '
             'with each and the error expected.\n\n')
    for b in broken:
        if b != 'README.md':
            fh.write('* `broken/%s` (%d bytes)\n' % (b, os.path.getsize(os.path.join(out, 'broken', b))))
PY

cat > "$BROKEN/README.md" <<'EOF'
# Broken audio fixtures

Generated by `tools/make_audio_fixtures.sh`. Each file must make the loader return an error.
Format: name — what is wrong — error we expect.

* `empty.wav` — 0 bytes — empty file.
* `random-bytes.wav` — 4096 bytes from python `random.seed(1)` (`getrandbits(8)` per byte), no RIFF header and none of symphonia 0.5.5's probe markers (the script checks) — unsupported format.
* `png-named.wav` — a valid 2x2 RGB PNG image named .wav — unsupported format.
* `truncated-header.wav` — first 20 bytes of `speech-16k-mono-s16.wav` (RIFF header, `fmt ` chunk cut off) — malformed header (symphonia 0.5.5 reports it as an I/O UnexpectedEof error while reading the `fmt ` chunk).
* `data-overpromise.wav` — 16 kHz mono s16 header whose `data` chunk (and RIFF size) claims 1,000,000 bytes, only 100 bytes (50 samples) follow — malformed header / truncated data (NOTE: some decoders read what is there; symphonia 0.5.5 reads 1152-frame packets and hits EOF on the first one, so it yields 0 samples) — if tolerated, at least "no samples".
* `data-overpromise-empty.wav` — same header claiming 1,000,000 bytes, 0 bytes follow — no samples (or malformed header).
* `zero-samples.wav` — valid 16 kHz mono s16 header, `data` chunk of 0 bytes — no samples (opens fine, n_frames = 0, first packet read is end-of-stream).
* `nan-f32.wav` — valid 16 kHz mono float WAV, 1600 samples, samples 100, 101, 800, 1599 are NaN — non-finite samples.
* `inf-f32.wav` — same with +inf at 100 and 1599, -inf at 800 — non-finite samples.
* `rate-0.wav` — 16-bit PCM header with sample rate 0 (and byte rate 0), 1600 samples of data — invalid sample rate (WARNING: symphonia 0.5.5 panics in `TimeBase::new(1, 0)` while probing this file; validate the header or catch the panic).
* `rate-2mhz.wav` — 16-bit PCM header with sample rate 2,000,000, 1600 samples — invalid sample rate (decoders accept it; our own range check must reject it).
* `unsupported-codec-opus.ogg` — valid Ogg Opus (ffmpeg libopus, 16 kHz input) — unsupported codec (symphonia 0.5.5 detects Opus in Ogg but has no decoder).
* `unsupported-codec-gsm.wav` — valid WAV with GSM 6.10 (format tag 0x0031), 8 kHz — unsupported codec (symphonia reports "wav: unsupported wave format").
* `text-named.flac` — a plain text file named .flac — unsupported format (symphonia probes by content, not extension).
EOF

du -sh "$OUT"
echo "audio fixtures written to $OUT/"
