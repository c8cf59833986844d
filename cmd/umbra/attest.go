package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/statefile"
)

func init() {
	register(&command{name: "attest", summary: "produce and verify attestation evidence (quote, verify, measure, export-tpm2)", run: runAttest})
}

const attestUsage = `Subcommands:
  quote --nonce HEX [-o evidence.json]     quote PCR 15 (and --pcrs) with the host's AK, with the event log
  verify EVIDENCE --nonce HEX --reference REF [--json]
                                           check evidence offline; exit 1 if it fails
  measure --type T [--description D] (--data S | --file F | --digest HEX)
                                           extend the umbra PCR and append to the event log
  export-tpm2 EVIDENCE --nonce HEX --dir D write the quote in tpm2_checkquote's format
  export-log [--format pcclient|cel-json|cel-tlv] [--event-log L | --evidence E] -o FILE
                                           write the event log for standard tools (tpm2_eventlog, CEL readers)
  challenge EVIDENCE -o CHALLENGE --keep SECRET
                                           verifier: bind the AK to the EK by credential activation ...
  activate CHALLENGE                       host: ... answer it with this TPM (prints the answer)
  verify ... --activation SECRET --answer ANSWER
                                           ... and trust the AK without a pinned ak_name`

func runAttest(ctx context.Context, env *cliEnv, args []string) int {
	sub := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "quote":
		return attestQuote(ctx, env, args)
	case "verify":
		return attestVerify(env, args)
	case "measure":
		return attestMeasure(ctx, env, args)
	case "export-tpm2":
		return attestExport(env, args)
	case "export-log":
		return attestExportLog(env, args)
	case "challenge":
		return attestChallenge(env, args)
	case "activate":
		return attestActivate(ctx, env, args)
	}
	fs := newFlagSet(env, "attest SUBCOMMAND", "", attestUsage)
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if sub != "" {
		fmt.Fprintf(env.stderr, "umbra attest: unknown subcommand %q\n", sub)
	}
	fs.Usage()
	return 2
}

func parseNonce(s string) ([]byte, error) {
	if s == "" {
		return nil, errors.New("--nonce is required: choose a fresh random one, e.g. $(openssl rand -hex 16)")
	}
	n, err := hex.DecodeString(s)
	if err != nil || len(n) < evidence.MinNonce || len(n) > evidence.MaxNonce {
		return nil, fmt.Errorf("--nonce must be %d-%d bytes in hex (%d-%d hex digits), e.g. $(openssl rand -hex 16)",
			evidence.MinNonce, evidence.MaxNonce, 2*evidence.MinNonce, 2*evidence.MaxNonce)
	}
	return n, nil
}

func parsePCRList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 || n > eventlog.MaxPCR {
			return nil, fmt.Errorf("PCR %q: want a number 0-%d", f, eventlog.MaxPCR)
		}
		out = append(out, n)
	}
	return out, nil
}

// readEventLog reads the event log file; a missing file is an empty log and an
// incomplete last record (a measurement in progress) is left out.
func readEventLog(path string) ([]eventlog.Record, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	recs, _, err := eventlog.ParseLines(f)
	if err != nil && !errors.Is(err, eventlog.ErrTornTail) {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return recs, nil
}

func attestQuote(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest quote", "", "Quote the umbra PCR (and any --pcrs) with the host's attestation key over a verifier's nonce,\nand write evidence: the quote, PCR values, event log, AK and EK public areas and host fingerprint.")
	tf := addTPMFlags(fs)
	nonceHex := fs.String("nonce", "", "verifier's nonce, hex (8-32 bytes)")
	out := fs.String("o", "-", "evidence file to write (- for stdout)")
	pcrs := fs.String("pcrs", "", "extra PCRs to quote, comma-separated (e.g. 0,7,13)")
	pcr := fs.Int("pcr", attest.DefaultPCR, "the PCR umbra measures into")
	logPath := fs.String("event-log", "", "event log (default STATE_DIR/"+attest.EventLogFile+")")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	nonce, err := parseNonce(*nonceHex)
	if err != nil {
		return attestFail(env, err)
	}
	extra, err := parsePCRList(*pcrs)
	if err != nil {
		return attestFail(env, err)
	}
	t, dir, err := tf.open(ctx, env)
	if err != nil {
		return attestFail(env, err)
	}
	defer t.Close()
	if *logPath == "" {
		*logPath = filepath.Join(dir, attest.EventLogFile)
	}
	a, err := evidence.NewAttester(t)
	if err != nil {
		return attestFail(env, err)
	}
	defer a.Close()
	ev, err := a.Collect(ctx, evidence.Options{
		Nonce: nonce, PCRs: append(extra, *pcr), LogPCRs: []int{*pcr},
		ReadLog: func() ([]eventlog.Record, error) { return readEventLog(*logPath) },
	})
	if err != nil {
		return attestFail(env, err)
	}
	b, err := ev.Marshal()
	if err != nil {
		return attestFail(env, err)
	}
	if *out == "-" {
		env.stdout.Write(b)
		return 0
	}
	if err := os.WriteFile(*out, b, 0o644); err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintf(env.stderr, "umbra: wrote %s: host %s, %d event log records, PCRs %v\n", *out, ev.HostFingerprint, len(ev.EventLog), pcrIndexes(ev))
	return 0
}

func pcrIndexes(ev *evidence.Evidence) []int {
	var out []int
	for _, p := range ev.Quote.PCRs {
		out = append(out, p.Index)
	}
	return out
}

func loadEvidence(path string) (*evidence.Evidence, error) {
	b, err := readFile(path, evidence.MaxFileBytes)
	if err != nil {
		return nil, err
	}
	ev, err := evidence.Parse(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ev, nil
}

func attestVerify(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest verify", "EVIDENCE", "Verify evidence offline (no TPM, no umbra state): quote signature, nonce, event log replay,\nhost and every measurement against the reference values. Exit 0 pass, 1 fail, 2 usage.")
	nonceHex := fs.String("nonce", "", "the nonce you gave the host, hex")
	refPath := fs.String("reference", "", "reference values file (YAML, see docs/attestation.md)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	keep := fs.String("activation", "", "the secret 'attest challenge --keep' wrote for this evidence (with --answer)")
	answer := fs.String("answer", "", "the host's answer from 'attest activate' (with --activation)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 || *refPath == "" {
		fmt.Fprintln(env.stderr, "umbra attest verify: need EVIDENCE and --reference")
		fs.Usage()
		return 2
	}
	if (*keep == "") != (*answer == "") {
		fmt.Fprintln(env.stderr, "umbra attest verify: --activation and --answer go together")
		return exitUsage
	}
	nonce, err := parseNonce(*nonceHex)
	if err != nil {
		return attestFail(env, err)
	}
	ev, err := loadEvidence(fs.Arg(0))
	if err != nil {
		return attestFail(env, err)
	}
	rb, err := readFile(*refPath, verify.MaxReferenceBytes)
	if err != nil {
		return attestFail(env, err)
	}
	ref, err := verify.ParseReference(bytes.NewReader(rb))
	if err != nil {
		return attestFail(env, fmt.Errorf("%s: %w", *refPath, err))
	}
	activated := false
	if *keep != "" {
		if err := checkActivation(ev, *keep, *answer); err != nil {
			return attestFail(env, err)
		}
		activated = true
	}
	rep := verify.VerifyActivated(ev, nonce, ref, activated)
	if *asJSON {
		rep.WriteJSON(env.stdout)
	} else {
		rep.WriteText(env.stdout)
	}
	if !rep.OK {
		return 1
	}
	return 0
}

func attestMeasure(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest measure", "", "Extend the umbra PCR with one measurement and append it to the event log.\nThe monitor does this itself at launch; this command is for scripts and tests.")
	tf := addTPMFlags(fs)
	typ := fs.String("type", "", "measurement type (monitor, guest-image, cmdline, vm-spec, policy, ...)")
	desc := fs.String("description", "", "human description (path, revision, name)")
	data := fs.String("data", "", "measure this string, recorded in the log")
	file := fs.String("file", "", "measure the SHA-256 of this file")
	digest := fs.String("digest", "", "measure this SHA-256 (hex)")
	pcr := fs.Int("pcr", attest.DefaultPCR, "the PCR umbra measures into")
	logPath := fs.String("event-log", "", "event log (default STATE_DIR/"+attest.EventLogFile+")")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	n := 0
	for _, s := range []string{*data, *file, *digest} {
		if s != "" {
			n++
		}
	}
	if fs.NArg() != 0 || *typ == "" || n != 1 {
		fmt.Fprintln(env.stderr, "umbra attest measure: need --type and exactly one of --data, --file, --digest")
		return 2
	}
	ev := eventlog.Event{Type: *typ, Description: *desc}
	switch {
	case *data != "":
		ev.Data = []byte(*data)
	case *file != "":
		f, err := os.Open(*file)
		if err != nil {
			return attestFail(env, err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return attestFail(env, err)
		}
		ev.Digest = h.Sum(nil)
	default:
		d, err := hex.DecodeString(*digest)
		if err != nil || len(d) != sha256.Size {
			return attestFail(env, errors.New("--digest must be 64 hex digits"))
		}
		ev.Digest = d
	}
	t, dir, err := tf.open(ctx, env)
	if err != nil {
		return attestFail(env, err)
	}
	defer t.Close()
	if *logPath == "" {
		*logPath = filepath.Join(dir, attest.EventLogFile)
	}
	m, err := eventlog.Open(ctx, t, *logPath, *pcr, nil)
	if err != nil {
		return attestFail(env, err)
	}
	defer m.Close()
	rec, err := m.Measure(ctx, ev)
	if err != nil {
		return attestFail(env, err)
	}
	if recs := m.TakeRecovered(); len(recs) > 0 {
		for _, r := range recs {
			fmt.Fprintf(env.stderr, "umbra: event log record %d (%s) was logged but never extended into PCR %d (its writer stopped between the two); extended it late and stated so in record %d\n", r.RecNum, r.Type, *pcr, r.StatementRecNum)
		}
		l, err := audit.Open(filepath.Join(dir, attest.AuditLogFile), nil)
		if err == nil {
			err = l.RecordRecoveries(ctx, recs)
			l.Close()
		}
		if err != nil {
			return attestFail(env, err)
		}
	}
	fmt.Fprintf(env.stdout, "record %d: %s %s = %s (PCR %d)\n", rec.RecNum, rec.Content.Type, rec.Content.Description, rec.Content.Value, rec.PCR)
	return 0
}

func attestExport(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest export-tpm2", "EVIDENCE", "Write the evidence's quote as tpm2_checkquote input files and print the command that checks it.")
	nonceHex := fs.String("nonce", "", "the nonce you gave the host, hex")
	dir := fs.String("dir", "", "directory to write ak.pem, quote.msg, quote.sig, pcrs.bin")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 || *dir == "" {
		fs.Usage()
		return 2
	}
	nonce, err := parseNonce(*nonceHex)
	if err != nil {
		return attestFail(env, err)
	}
	ev, err := loadEvidence(fs.Arg(0))
	if err != nil {
		return attestFail(env, err)
	}
	a, err := evidence.ExportTPM2Tools(ev, *dir, nonce)
	if err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintf(env.stdout, "tpm2_checkquote %s\n", strings.Join(a, " "))
	return 0
}

// attestFail prints err and returns exit status 1. The attest and audit commands use
// their own helper so they do not depend on other commands' helpers.
func attestFail(env *cliEnv, err error) int {
	fmt.Fprintf(env.stderr, "umbra: %v\n", err)
	return 1
}

func attestExportLog(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest export-log", "", `Write the event log in an encoding standard tools read (docs/attestation.md, "Reading
the event log with standard tools"). Every record becomes a PCCLIENT_STD event of type
EV_EVENT_TAG whose event data is its digest's preimage, so a reader that knows nothing
of umbra checks each digest (SHA-256 of the event data) and replays the PCR.
  --format pcclient  TCG PC Client binary event log (tpm2_eventlog FILE replays PCR 15)
  --format cel-json  TCG Canonical Event Log, JSON encoding: an array of records
  --format cel-tlv   TCG Canonical Event Log, TLV encoding
The records come from the state directory's event log, or with --evidence from
evidence (the log the quote covers).`)
	stateDir := fs.String("state-dir", "", "umbra state directory (default as for the other commands)")
	logPath := fs.String("event-log", "", "event log (default STATE_DIR/"+attest.EventLogFile+")")
	evPath := fs.String("evidence", "", "export the event log held by this evidence file instead")
	format := fs.String("format", "pcclient", "pcclient, cel-json or cel-tlv")
	out := fs.String("o", "", "output file (required, a new file)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 0 || *out == "" {
		fmt.Fprintln(env.stderr, "umbra attest export-log: need -o FILE")
		return exitUsage
	}
	export, ok := map[string]func([]eventlog.Record) ([]byte, error){
		"pcclient": eventlog.ExportPCClient, "cel-json": eventlog.ExportCELJSON, "cel-tlv": eventlog.ExportCELTLV,
	}[*format]
	if !ok {
		fmt.Fprintf(env.stderr, "umbra attest export-log: --format %q: want pcclient, cel-json or cel-tlv\n", *format)
		return exitUsage
	}
	if *evPath != "" && (*logPath != "" || *stateDir != "") {
		fmt.Fprintln(env.stderr, "umbra attest export-log: --evidence names the records; --event-log and --state-dir have no effect with it")
		return exitUsage
	}
	if err := checkOutputPath(*out, false); err != nil {
		fmt.Fprintf(env.stderr, "umbra attest export-log: %v\n", err)
		return exitUsage
	}
	var recs []eventlog.Record
	from := *evPath
	if from != "" {
		ev, err := loadEvidence(from)
		if err != nil {
			return attestFail(env, err)
		}
		recs = ev.EventLog
	} else {
		if *logPath == "" {
			dir := *stateDir
			if dir == "" {
				var err error
				if dir, err = sealing.DefaultStateDir(); err != nil {
					return attestFail(env, err)
				}
			}
			*logPath = filepath.Join(dir, attest.EventLogFile)
		}
		from = *logPath
		var err error
		if recs, err = readEventLog(*logPath); err != nil {
			return attestFail(env, err)
		}
	}
	b, err := export(recs)
	if err != nil {
		return attestFail(env, fmt.Errorf("%s: %w", from, err))
	}
	if err := statefile.WriteAtomic(*out, b, 0o644); err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintf(env.stderr, "umbra: wrote %d events of %s to %s (%s)\n", len(recs), from, *out, *format)
	return exitOK
}
