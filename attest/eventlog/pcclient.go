package eventlog

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// This file maps umbra's records onto a registered CEL content type and exports them
// in the TCG PC Client binary event log format, which standard tools read
// (tpm2_eventlog replays it).
//
// The mapping (docs/attestation.md, "Reading the event log with standard tools"):
// an umbra record is a CEL record of content type PCCLIENT_STD whose event is of
// type EV_EVENT_TAG (0x00000006) and whose event data is the digest's preimage,
//
//	"umbra-event-v1" 0x00 || len(type) u16be || type || len(description) u32be ||
//	description || value
//
// so the digest extended into the PCR is exactly SHA-256 of the event data, as the
// PC Client specification has it for measured events, and a tool that knows nothing
// of umbra can check every digest and replay the PCR. The measured object's own data
// (content.data: the command line, the spec, an anchor) is not part of the preimage;
// it stays in umbra's own log and evidence, where its SHA-256 is the value.

// Event types and constants of the TCG PC Client Platform Firmware Profile.
const (
	EvNoAction = 0x00000003
	EvEventTag = 0x00000006
	algSHA256  = 0x000B
)

// EventData returns the PC Client event data of r: the preimage of its digest.
func EventData(r *Record) []byte {
	v := r.MeasuredValue()
	var b bytes.Buffer
	b.WriteString("umbra-event-v1\x00")
	binary.Write(&b, binary.BigEndian, uint16(len(r.Content.Type)))
	b.WriteString(r.Content.Type)
	binary.Write(&b, binary.BigEndian, uint32(len(r.Content.Description)))
	b.WriteString(r.Content.Description)
	b.Write(v)
	return b.Bytes()
}

// ExportPCClient writes validated records as a TCG PC Client "crypto agile" binary
// event log: the Spec ID Event03 header (SHA-256 only), then one TCG_PCR_EVENT2 per
// record.
func ExportPCClient(recs []Record) ([]byte, error) {
	if err := ValidateLog(recs); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	binary.Write(&spec, le, uint32(0)) // platformClass: client
	spec.Write([]byte{0, 2, 0, 2})     // specVersionMinor, Major, errata, uintnSize (2: UINT64)
	binary.Write(&spec, le, uint32(1)) // numberOfAlgorithms
	binary.Write(&spec, le, uint16(algSHA256))
	binary.Write(&spec, le, uint16(32))
	spec.WriteByte(0) // vendorInfoSize

	var out bytes.Buffer
	// TCG_PCR_EVENT (SHA-1 format) carrying the Spec ID event.
	binary.Write(&out, le, uint32(0))
	binary.Write(&out, le, uint32(EvNoAction))
	out.Write(make([]byte, 20))
	binary.Write(&out, le, uint32(spec.Len()))
	out.Write(spec.Bytes())
	for i := range recs {
		r := &recs[i]
		data := EventData(r)
		binary.Write(&out, le, uint32(r.PCR))
		binary.Write(&out, le, uint32(EvEventTag))
		binary.Write(&out, le, uint32(1)) // digest count
		binary.Write(&out, le, uint16(algSHA256))
		d := r.SHA256()
		if len(d) != 32 {
			return nil, fmt.Errorf("record %d: no SHA-256 digest", r.RecNum)
		}
		out.Write(d)
		binary.Write(&out, le, uint32(len(data)))
		out.Write(data)
	}
	return out.Bytes(), nil
}
