package eventlog

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
)

// This file exports umbra's records in the two encodings of the TCG Canonical Event
// Log specification that readers outside umbra take: TLV and JSON. Each record is a
// CEL record of the registered content type PCCLIENT_STD (the same mapping as the PC
// Client export, pcclient.go): event type EV_EVENT_TAG, event data the digest's
// preimage, so SHA-256(event data) is the digest and a reader that knows nothing of
// umbra checks every digest and replays the PCR. The state file itself stays JSON
// Lines with content_type "umbra" (docs/attestation.md says why).

// CEL top-level and content type values (TCG CEL, "Canonical Event Log Record").
const (
	celRecnum             = 0
	celPCR                = 1
	celDigests            = 3
	celContentPCClientStd = 5
	celPCClientEventType  = 0 // inside PCCLIENT_STD content
	celPCClientEventData  = 1
)

// CEL-JSON names of the content type and event type umbra's records use.
const (
	CELContentTypePCClientStd = "pcclient_std"
	CELEventTypeEventTag      = "ev_event_tag"
)

func appendTLV(b []byte, typ byte, value []byte) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(value)))
	return append(b, value...)
}

// ExportCELTLV writes validated records in the CEL TLV encoding: per record, recnum
// (8 bytes), PCR (1 byte), digests (one TLV per bank, its type the TPM_ALG_ID), and a
// PCCLIENT_STD content of event type and event data.
func ExportCELTLV(recs []Record) ([]byte, error) {
	if err := ValidateLog(recs); err != nil {
		return nil, err
	}
	var out []byte
	for i := range recs {
		r := &recs[i]
		out = appendTLV(out, celRecnum, binary.BigEndian.AppendUint64(nil, r.RecNum))
		out = appendTLV(out, celPCR, []byte{byte(r.PCR)})
		out = appendTLV(out, celDigests, appendTLV(nil, algSHA256, r.SHA256()))
		content := appendTLV(nil, celPCClientEventType, binary.BigEndian.AppendUint32(nil, EvEventTag))
		content = appendTLV(content, celPCClientEventData, EventData(r))
		out = appendTLV(out, celContentPCClientStd, content)
	}
	return out, nil
}

// CELJSONRecord is one record of the CEL JSON encoding as umbra exports it. Byte
// strings (digest, event data) are lower-case hex.
type CELJSONRecord struct {
	RecNum      uint64           `json:"recnum"`
	PCR         int              `json:"pcr"`
	Digests     []Digest         `json:"digests"`
	ContentType string           `json:"content_type"`
	Content     CELPCClientEvent `json:"content"`
}

// CELPCClientEvent is the content of a PCCLIENT_STD record.
type CELPCClientEvent struct {
	EventType string `json:"event_type"`
	EventData string `json:"event_data"`
}

// ExportCELJSON writes validated records as a CEL JSON array, one PCCLIENT_STD record
// per umbra record, indented for people.
func ExportCELJSON(recs []Record) ([]byte, error) {
	if err := ValidateLog(recs); err != nil {
		return nil, err
	}
	out := make([]CELJSONRecord, len(recs))
	for i := range recs {
		r := &recs[i]
		out[i] = CELJSONRecord{
			RecNum: r.RecNum, PCR: r.PCR, Digests: []Digest{{HashAlg: HashAlg, Digest: r.Digests[0].Digest}},
			ContentType: CELContentTypePCClientStd,
			Content:     CELPCClientEvent{EventType: CELEventTypeEventTag, EventData: hex.EncodeToString(EventData(r))},
		}
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return nil, fmt.Errorf("encode CEL JSON: %w", err)
	}
	return b.Bytes(), nil
}
