package attestconn

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"strings"
	"time"

	"github.com/go-json-experiment/json"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/strictjson"
)

// Version is the handshake version this package speaks.
const Version = 1

// Role is a side's part in the connection; it is mixed into the side's quote nonce,
// so a quote one side made can never be passed off as the other side's.
type Role string

const (
	// RoleClient dials: a migration's source.
	RoleClient Role = "client"
	// RoleServer accepts: a migration's destination.
	RoleServer Role = "server"
)

func (r Role) peer() Role {
	if r == RoleClient {
		return RoleServer
	}
	return RoleClient
}

// Attester is this host's TPM as the handshake needs it; *evidence.Attester is one.
type Attester interface {
	// Collect quotes the PCRs over opts.Nonce and returns the evidence.
	Collect(ctx context.Context, opts evidence.Options) (*evidence.Evidence, error)
	// Activate answers a credential challenge for this TPM's EK and AK.
	Activate(c *evidence.Challenge) ([]byte, error)
}

// Config says how this side attests itself and what it accepts from the peer.
type Config struct {
	// Attester quotes this host's TPM. Required.
	Attester Attester
	// ReadLog returns this monitor's event log, the measurements the quote covers.
	// Required: a quote without the log that explains its PCRs proves nothing.
	ReadLog func() ([]eventlog.Record, error)
	// PCRs are the PCRs quoted (default: umbra's PCR); LogPCRs those the log
	// accounts for (default: umbra's PCR).
	PCRs, LogPCRs []int
	// Reference is what the peer must prove: enrolled hosts, PCR values, the
	// approved monitor measurement. Required.
	Reference *verify.Reference
	// Timeout bounds the whole handshake, TLS included (default 30 s).
	Timeout time.Duration
}

// Peer is what the handshake proved about the other side.
type Peer struct {
	// Fingerprint is the peer host's EK fingerprint (umbra host id).
	Fingerprint string
	// AKName is the TPM name of the AK that signed the peer's quote, bound to the
	// EK by credential activation.
	AKName string
	// Evidence is the peer's evidence, its quote over this session's nonce.
	Evidence *evidence.Evidence
	// Report is the verification of Evidence against Config.Reference; OK.
	Report *verify.Report
}

// Conn is an attested connection: a TLS 1.3 stream to a peer that passed the
// handshake. Read and Write carry the caller's protocol.
type Conn struct {
	*tls.Conn
	peer Peer
}

// Peer returns what the handshake proved about the other side.
func (c *Conn) Peer() Peer { return c.peer }

// RefusedError is a handshake that ended because one side did not accept the other:
// By says which side refused and Reasons why (the report's failures).
type RefusedError struct {
	By      Role
	Reasons []string
}

func (e *RefusedError) Error() string {
	who := "this side"
	if e.By != "" {
		who = "the " + string(e.By)
	}
	return fmt.Sprintf("attested connection refused by %s: %s", who, strings.Join(e.Reasons, "; "))
}

// Client runs the handshake as the dialling side over conn.
func Client(ctx context.Context, conn net.Conn, cfg Config) (*Conn, error) {
	return handshake(ctx, conn, cfg, RoleClient)
}

// Server runs the handshake as the accepting side over conn.
func Server(ctx context.Context, conn net.Conn, cfg Config) (*Conn, error) {
	return handshake(ctx, conn, cfg, RoleServer)
}

// exporterLabel is the RFC 8446 exporter label of the session binding.
const exporterLabel = "EXPORTER-umbra-attestconn-v1"

// quoteNonce is the nonce a side of the given role quotes over in the session whose
// exporter is exp.
func quoteNonce(exp []byte, role Role) []byte {
	h := sha256.New()
	h.Write([]byte("umbra attestconn v1 quote nonce\x00"))
	h.Write([]byte(role))
	h.Write([]byte{0})
	h.Write(exp)
	return h.Sum(nil)[:evidence.MaxNonce]
}

type hello struct {
	Version   int                 `json:"version"`
	Role      Role                `json:"role"`
	Evidence  []byte              `json:"evidence"`
	Challenge *evidence.Challenge `json:"challenge,omitempty"`
}

type answer struct {
	Secret    []byte              `json:"secret"`
	Challenge *evidence.Challenge `json:"challenge,omitempty"`
	Verdict   *verdict            `json:"verdict,omitempty"`
}

type verdict struct {
	Accepted bool     `json:"accepted"`
	Reasons  []string `json:"reasons,omitempty"`
}

// maxReasons bounds what a peer's refusal may say.
const (
	maxReasons     = 32
	maxReasonBytes = 512
)

func (v *verdict) validate() error {
	if v.Accepted && len(v.Reasons) > 0 {
		return errors.New("an accepting verdict gives reasons")
	}
	if !v.Accepted && len(v.Reasons) == 0 {
		return errors.New("a refusing verdict gives no reason")
	}
	if len(v.Reasons) > maxReasons {
		return fmt.Errorf("verdict gives %d reasons, at most %d", len(v.Reasons), maxReasons)
	}
	for _, r := range v.Reasons {
		if len(r) > maxReasonBytes {
			return fmt.Errorf("a verdict reason is %d bytes, at most %d", len(r), maxReasonBytes)
		}
	}
	return nil
}

func decodeHello(b []byte, from Role) (*hello, *evidence.Evidence, error) {
	var h hello
	if err := strictjson.Decode(b, &h); err != nil {
		return nil, nil, fmt.Errorf("the peer's hello is not valid: %w", err)
	}
	if h.Version != Version {
		return nil, nil, fmt.Errorf("the peer speaks handshake version %d, this umbra speaks %d: upgrade the older side", h.Version, Version)
	}
	if h.Role != from {
		return nil, nil, fmt.Errorf("the peer says it is the %q side, but it is the %s", h.Role, from)
	}
	if (h.Challenge != nil) != (from == RoleServer) {
		return nil, nil, errors.New("the peer's hello has a challenge where none belongs, or lacks one")
	}
	if h.Challenge != nil {
		if err := checkChallenge(h.Challenge); err != nil {
			return nil, nil, err
		}
	}
	ev, err := evidence.Parse(bytes.NewReader(h.Evidence))
	if err != nil {
		return nil, nil, fmt.Errorf("the peer's evidence: %w", err)
	}
	return &h, ev, nil
}

func decodeAnswer(b []byte, wantChallenge, wantVerdict bool) (*answer, error) {
	var a answer
	if err := strictjson.Decode(b, &a); err != nil {
		return nil, fmt.Errorf("the peer's answer is not valid: %w", err)
	}
	if len(a.Secret) != evidence.CredentialSize {
		return nil, fmt.Errorf("the peer's activated secret is %d bytes, not %d", len(a.Secret), evidence.CredentialSize)
	}
	if (a.Challenge != nil) != wantChallenge || (a.Verdict != nil) != wantVerdict {
		return nil, errors.New("the peer's answer does not have the parts this step needs")
	}
	if a.Challenge != nil {
		if err := checkChallenge(a.Challenge); err != nil {
			return nil, err
		}
	}
	if a.Verdict != nil {
		if err := a.Verdict.validate(); err != nil {
			return nil, fmt.Errorf("the peer's verdict: %w", err)
		}
	}
	return &a, nil
}

func decodeVerdict(b []byte) (*verdict, error) {
	var v verdict
	if err := strictjson.Decode(b, &v); err != nil {
		return nil, fmt.Errorf("the peer's verdict is not valid: %w", err)
	}
	if err := v.validate(); err != nil {
		return nil, fmt.Errorf("the peer's verdict: %w", err)
	}
	return &v, nil
}

// checkChallenge bounds a challenge's fields (its contents are the TPM's to judge).
func checkChallenge(c *evidence.Challenge) error {
	if len(c.IDObject) == 0 || len(c.IDObject) > 1024 || len(c.Secret) == 0 || len(c.Secret) > 1024 || len(c.EKPublic) > evidence.MaxPublicArea || len(c.AKName) > 256 {
		return errors.New("the peer's credential challenge is malformed (a field is empty or oversized)")
	}
	return nil
}

func marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only the handshake's own types are marshalled here.
		panic(fmt.Sprintf("attestconn: encode %T: %v", v, err))
	}
	return b
}

// session is one side's state during the handshake.
type session struct {
	cfg  Config
	role Role
	tls  *tls.Conn
	exp  []byte
	// peerEv is the peer's parsed evidence; peerSecret what its challenge must yield.
	peerEv     *evidence.Evidence
	peerSecret []byte
}

func handshake(ctx context.Context, conn net.Conn, cfg Config, role Role) (_ *Conn, err error) {
	if cfg.Attester == nil || cfg.ReadLog == nil || cfg.Reference == nil {
		return nil, errors.New("attestconn: Config needs an Attester, a ReadLog and a Reference")
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("attestconn: set handshake deadline: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	tc, err := tlsConn(conn, role)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			tc.Close()
			if ctx.Err() != nil && !errors.As(err, new(*RefusedError)) {
				err = fmt.Errorf("%w (handshake timeout %v)", err, timeout)
			}
		}
	}()
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("attestconn: TLS handshake: %w", err)
	}
	st := tc.ConnectionState()
	if st.Version != tls.VersionTLS13 {
		return nil, fmt.Errorf("attestconn: the peer negotiated TLS version %#x, not 1.3", st.Version)
	}
	exp, err := st.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return nil, fmt.Errorf("attestconn: export the session binding: %w", err)
	}
	s := &session{cfg: cfg, role: role, tls: tc, exp: exp}
	var peer *Peer
	if role == RoleClient {
		peer, err = s.runClient(ctx)
	} else {
		peer, err = s.runServer(ctx)
	}
	if err != nil {
		return nil, err
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("attestconn: clear handshake deadline: %w", err)
	}
	return &Conn{Conn: tc, peer: *peer}, nil
}

// ownEvidence quotes over this side's nonce for the session.
func (s *session) ownEvidence(ctx context.Context) ([]byte, error) {
	ev, err := s.cfg.Attester.Collect(ctx, evidence.Options{
		Nonce:   quoteNonce(s.exp, s.role),
		PCRs:    s.cfg.PCRs,
		LogPCRs: s.cfg.LogPCRs,
		ReadLog: s.cfg.ReadLog,
	})
	if err != nil {
		return nil, fmt.Errorf("attestconn: quote this host: %w", err)
	}
	return ev.Marshal()
}

// challengePeer makes the credential challenge for the peer's evidence.
func (s *session) challengePeer() (*evidence.Challenge, error) {
	c, secret, err := evidence.MakeChallenge(s.peerEv)
	if err != nil {
		return nil, fmt.Errorf("attestconn: the peer's evidence: %w", err)
	}
	s.peerSecret = secret
	return c, nil
}

// activate answers the peer's challenge. A TPM that cannot answer (it does not hold
// the EK or AK its own evidence names, or it failed) still sends an answer, a random
// one the peer will refuse as a failed activation, so that both sides end with an
// error that says what happened rather than a closed connection.
func (s *session) activate(c *evidence.Challenge) ([]byte, error) {
	secret, err := s.cfg.Attester.Activate(c)
	if err == nil && len(secret) == evidence.CredentialSize {
		return secret, nil
	}
	if err == nil {
		err = fmt.Errorf("the TPM released %d bytes, not %d", len(secret), evidence.CredentialSize)
	}
	random := make([]byte, evidence.CredentialSize)
	if _, rerr := rand.Read(random); rerr != nil {
		return nil, rerr
	}
	return random, fmt.Errorf("attestconn: this host's TPM could not answer the peer's credential challenge: %w", err)
}

// judge verifies the peer's evidence and its answer to our challenge; it returns the
// peer on acceptance and the reasons on refusal.
func (s *session) judge(secret []byte) (*Peer, []string) {
	activated := subtle.ConstantTimeCompare(secret, s.peerSecret) == 1
	rep := verify.VerifyActivated(s.peerEv, quoteNonce(s.exp, s.role.peer()), s.cfg.Reference, activated)
	reasons := rep.Failures()
	if !activated {
		reasons = append([]string{"credential activation: the peer's TPM did not release the secret bound to its EK and AK (its AK is not in the TPM its EK names)"}, reasons...)
	}
	if !rep.OK && len(reasons) == 0 {
		reasons = []string{"the peer's evidence did not verify"}
	}
	if len(reasons) > 0 {
		return nil, capReasons(reasons)
	}
	return &Peer{Fingerprint: rep.HostFingerprint, AKName: rep.AKName, Evidence: s.peerEv, Report: rep}, nil
}

func capReasons(rs []string) []string {
	if len(rs) > maxReasons {
		rs = rs[:maxReasons]
	}
	out := make([]string, len(rs))
	for i, r := range rs {
		if len(r) > maxReasonBytes {
			r = r[:maxReasonBytes]
		}
		out[i] = r
	}
	return out
}

// refuse tells the peer why (best effort) and returns the local refusal.
func (s *session) refuse(k frameKind, reasons []string, secret []byte, c *evidence.Challenge) error {
	v := &verdict{Accepted: false, Reasons: reasons}
	switch k {
	case frameAnswer:
		writeFrame(s.tls, frameAnswer, marshal(answer{Secret: secret, Challenge: c, Verdict: v}))
	case frameVerdict:
		writeFrame(s.tls, frameVerdict, marshal(v))
	}
	return &RefusedError{By: s.role, Reasons: reasons}
}

func (s *session) runClient(ctx context.Context) (*Peer, error) {
	own, err := s.ownEvidence(ctx)
	if err != nil {
		return nil, err
	}
	if err := writeFrame(s.tls, frameHello, marshal(hello{Version: Version, Role: s.role, Evidence: own})); err != nil {
		return nil, fmt.Errorf("attestconn: send hello: %w", err)
	}
	b, err := readFrame(s.tls, frameHello)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	h, ev, err := decodeHello(b, RoleServer)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	s.peerEv = ev
	mine, selfErr := s.activate(h.Challenge)
	c, err := s.challengePeer()
	if err != nil {
		return nil, err
	}
	if err := writeFrame(s.tls, frameAnswer, marshal(answer{Secret: mine, Challenge: c})); err != nil {
		return nil, fmt.Errorf("attestconn: send answer: %w", err)
	}
	b, err = readFrame(s.tls, frameAnswer)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	a, err := decodeAnswer(b, false, true)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	peer, reasons := s.judge(a.Secret)
	if selfErr != nil {
		s.refuse(frameVerdict, []string{"the client could not prove its own identity"}, nil, nil)
		return nil, selfErr
	}
	if !a.Verdict.Accepted {
		return nil, &RefusedError{By: RoleServer, Reasons: a.Verdict.Reasons}
	}
	if peer == nil {
		return nil, s.refuse(frameVerdict, reasons, nil, nil)
	}
	if err := writeFrame(s.tls, frameVerdict, marshal(verdict{Accepted: true})); err != nil {
		return nil, fmt.Errorf("attestconn: send verdict: %w", err)
	}
	return peer, nil
}

func (s *session) runServer(ctx context.Context) (*Peer, error) {
	b, err := readFrame(s.tls, frameHello)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	_, ev, err := decodeHello(b, RoleClient)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	s.peerEv = ev
	c, err := s.challengePeer()
	if err != nil {
		return nil, err
	}
	own, err := s.ownEvidence(ctx)
	if err != nil {
		return nil, err
	}
	if err := writeFrame(s.tls, frameHello, marshal(hello{Version: Version, Role: s.role, Evidence: own, Challenge: c})); err != nil {
		return nil, fmt.Errorf("attestconn: send hello: %w", err)
	}
	b, err = readFrame(s.tls, frameAnswer)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	a, err := decodeAnswer(b, true, false)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	mine, selfErr := s.activate(a.Challenge)
	peer, reasons := s.judge(a.Secret)
	if peer == nil {
		return nil, s.refuse(frameAnswer, reasons, mine, nil)
	}
	if err := writeFrame(s.tls, frameAnswer, marshal(answer{Secret: mine, Verdict: &verdict{Accepted: true}})); err != nil {
		return nil, fmt.Errorf("attestconn: send answer: %w", err)
	}
	b, err = readFrame(s.tls, frameVerdict)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	v, err := decodeVerdict(b)
	if err != nil {
		return nil, fmt.Errorf("attestconn: %w", err)
	}
	if selfErr != nil {
		return nil, selfErr
	}
	if !v.Accepted {
		return nil, &RefusedError{By: RoleClient, Reasons: v.Reasons}
	}
	return peer, nil
}

// tlsConn wraps conn in TLS 1.3 with a throw-away certificate. Certificates are not
// verified: the peer is authenticated by its quote over the session's exporter.
func tlsConn(conn net.Conn, role Role) (*tls.Conn, error) {
	cert, err := ephemeralCert()
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// The certificate authenticates nothing here (see the package doc): the
		// exporter binding of both quotes does.
		InsecureSkipVerify: true,
		ServerName:         "umbra-attestconn",
	}
	if role == RoleClient {
		return tls.Client(conn, cfg), nil
	}
	return tls.Server(conn, cfg), nil
}

func ephemeralCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("attestconn: session key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "umbra-attestconn"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("attestconn: session certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
