// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title Hotpot's market: gateway deposits, node stakes, receipt
/// settlement and k-of-n slashing on any EVM chain.
///
/// Who is who. A *gateway* sells inference to users and owes nodes for the
/// work they did; it keeps a deposit here that backs what it owes. A *node*
/// runs blocks of a model for gateways and keeps a stake here that it loses
/// if it is caught cheating. Registered gateways are also the *auditors*:
/// they re-run a node's work, and a slash needs `quorum` of them to sign the
/// same conviction. The deployer (`owner`) registers gateways; on a public
/// deployment that should be a multisig or a governance contract.
///
/// Currency: the chain's native coin (ETH on Ethereum and its rollups, the
/// test coin on anvil). Why: every EVM chain has one, so there is no token
/// contract to deploy, trust or approve, and a stake, a deposit and a payout
/// are each one plain transfer. Off chain Hotpot counts micro-credits; one
/// micro-credit is `weiPerMicroCredit` wei, fixed at deployment, so a receipt
/// signed in credits means the same amount of coin to everyone.
///
/// What is off chain: sessions, audits and evidence files. A conviction
/// names the evidence by its hash; each auditor re-ran the evidence before
/// signing.
///
/// Money paid out is never pushed to an address inside another call:
/// settlement and slashing credit `earningsOf`, which its owner claims
/// (`claim`), so one receiver can never make a batch fail.
contract HotpotMarket {
    // ------------------------------------------------------------------
    // Configuration, fixed at deployment
    // ------------------------------------------------------------------

    /// Registers and removes gateways (auditors).
    address public immutable owner;
    /// Seconds between `requestUnstake` (or `requestDepositWithdrawal`)
    /// and the withdrawal; the amount stays slashable (or payable to nodes)
    /// until then.
    uint256 public immutable unbondingDelay;
    /// How many registered auditors must sign a conviction to slash.
    uint256 public immutable quorum;
    /// Parts per million of a slashed stake that go to the accuser; the rest
    /// is burned (kept in this contract for ever, counted in `burned`).
    uint256 public immutable accuserSharePpm;
    /// Wei per off-chain micro-credit.
    uint256 public immutable weiPerMicroCredit;

    // ------------------------------------------------------------------
    // State
    // ------------------------------------------------------------------

    /// An amount on its way out, withdrawable from `readyAt` (Unix seconds).
    struct Pending {
        uint256 amount;
        uint256 readyAt;
    }

    mapping(address => bool) public isGateway;
    uint256 public gatewayCount;
    mapping(address => uint256) private deposits;
    mapping(address => uint256) private stakes;
    /// Stake on its way out (still slashable).
    mapping(address => Pending) public unstaking;
    /// Deposit on its way out (still pays receipts).
    mapping(address => Pending) public withdrawing;
    /// Settled pay and accusers' shares, not yet claimed.
    mapping(address => uint256) public earningsOf;
    /// Receipt ids already paid.
    mapping(bytes32 => bool) public settled;
    /// Convictions already slashed (by their EIP-712 struct hash).
    mapping(bytes32 => bool) public slashed;
    /// Wei destroyed by slashing.
    uint256 public burned;

    // ------------------------------------------------------------------
    // Signed messages (EIP-712)
    // ------------------------------------------------------------------

    /// What a gateway signs for a node: pay `amount` micro-credits of my
    /// deposit to `node`, once, under Hotpot's receipt id `id`.
    struct Receipt {
        bytes32 id;
        address node;
        address gateway;
        uint64 amount;
    }

    /// An ECDSA signature (v is 27 or 28).
    struct Sig {
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant RECEIPT_TYPEHASH =
        keccak256("Receipt(bytes32 id,address node,address gateway,uint64 amount)");
    bytes32 private constant CONVICTION_TYPEHASH =
        keccak256("Conviction(address node,bytes32 model,bytes32 evidence)");
    /// secp256k1's order / 2: larger `s` values are the malleable twins.
    uint256 private constant HALF_ORDER = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    // ------------------------------------------------------------------
    // Events and errors
    // ------------------------------------------------------------------

    event GatewaySet(address indexed gateway, bool registered);
    event Deposited(address indexed gateway, uint256 amount);
    event DepositWithdrawalRequested(address indexed gateway, uint256 amount, uint256 readyAt);
    event Staked(address indexed node, uint256 amount);
    event UnstakeRequested(address indexed node, uint256 amount, uint256 readyAt);
    event Withdrawn(address indexed who, uint256 amount);
    event Settled(bytes32 indexed id, address indexed node, address indexed gateway, uint256 amount);
    event Claimed(address indexed who, uint256 amount);
    event Slashed(address indexed node, bytes32 indexed conviction, address indexed accuser, uint256 amount, uint256 share);

    error NotOwner();
    error NotGateway(address who);
    error AlreadySettled(bytes32 id);
    error BadSignature(bytes32 id, address signer);
    error InsufficientDeposit(address gateway, uint256 available, uint256 needed);
    error LengthMismatch();
    error NotReady(uint256 readyAt);
    error Nothing();
    error TooMuch(uint256 available, uint256 asked);
    error UnsortedSigners();
    error TooFewSignatures(uint256 valid, uint256 needed);
    error AlreadySlashed(bytes32 conviction);
    error TransferFailed();

    constructor(uint256 unbondingDelay_, uint256 quorum_, uint256 accuserSharePpm_, uint256 weiPerMicroCredit_) {
        require(quorum_ > 0 && accuserSharePpm_ <= 1_000_000 && weiPerMicroCredit_ > 0, "bad configuration");
        owner = msg.sender;
        unbondingDelay = unbondingDelay_;
        quorum = quorum_;
        accuserSharePpm = accuserSharePpm_;
        weiPerMicroCredit = weiPerMicroCredit_;
    }

    // ------------------------------------------------------------------
    // Registration
    // ------------------------------------------------------------------

    /// Registers (or removes) a gateway, which also makes it an auditor.
    function setGateway(address gateway, bool registered) external {
        if (msg.sender != owner) revert NotOwner();
        if (isGateway[gateway] != registered) {
            isGateway[gateway] = registered;
            if (registered) gatewayCount += 1;
            else gatewayCount -= 1;
        }
        emit GatewaySet(gateway, registered);
    }

    // ------------------------------------------------------------------
    // Deposits (gateways) and stakes (nodes)
    // ------------------------------------------------------------------

    function deposit() external payable {
        if (msg.value == 0) revert Nothing();
        deposits[msg.sender] += msg.value;
        emit Deposited(msg.sender, msg.value);
    }

    /// Starts taking `amount` of the caller's deposit out. Receipts may still
    /// draw on it until `withdrawDeposit` (a gateway cannot run off with
    /// what it owes before its nodes had the delay to settle).
    function requestDepositWithdrawal(uint256 amount) external {
        Pending storage p = withdrawing[msg.sender];
        deposits[msg.sender] = _startLeaving(deposits[msg.sender], amount, p);
        emit DepositWithdrawalRequested(msg.sender, amount, p.readyAt);
    }

    function withdrawDeposit() external {
        _payOut(withdrawing[msg.sender]);
    }

    function stake() external payable {
        if (msg.value == 0) revert Nothing();
        stakes[msg.sender] += msg.value;
        emit Staked(msg.sender, msg.value);
    }

    /// Starts taking `amount` of the caller's stake out; it stays slashable
    /// for `unbondingDelay` seconds (a new request restarts the delay).
    function requestUnstake(uint256 amount) external {
        Pending storage p = unstaking[msg.sender];
        stakes[msg.sender] = _startLeaving(stakes[msg.sender], amount, p);
        emit UnstakeRequested(msg.sender, amount, p.readyAt);
    }

    /// Moves `amount` of `have` into `p` (restarting its delay); returns
    /// what is left of `have`.
    function _startLeaving(uint256 have, uint256 amount, Pending storage p) private returns (uint256) {
        if (amount == 0) revert Nothing();
        if (amount > have) revert TooMuch(have, amount);
        p.amount += amount;
        p.readyAt = block.timestamp + unbondingDelay;
        return have - amount;
    }

    /// Pays out the caller's unstaked amount once its delay has passed.
    function withdraw() external {
        _payOut(unstaking[msg.sender]);
    }

    function _payOut(Pending storage p) private {
        uint256 amount = p.amount;
        if (amount == 0) revert Nothing();
        if (block.timestamp < p.readyAt) revert NotReady(p.readyAt);
        p.amount = 0;
        emit Withdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    // ------------------------------------------------------------------
    // Settlement
    // ------------------------------------------------------------------

    /// Pays a batch of gateway-signed receipts: each from its gateway's
    /// deposit to its node's earnings, each id once. Anyone may submit (the
    /// node itself, without the gateway's goodwill). One bad receipt
    /// reverts the whole batch, naming it.
    function settle(Receipt[] calldata receipts, Sig[] calldata sigs) external {
        if (receipts.length != sigs.length) revert LengthMismatch();
        bytes32 domain = _domainSeparator();
        for (uint256 i = 0; i < receipts.length; i++) {
            Receipt calldata r = receipts[i];
            if (settled[r.id]) revert AlreadySettled(r.id);
            bytes32 digest = _digest(domain, keccak256(abi.encode(RECEIPT_TYPEHASH, r.id, r.node, r.gateway, r.amount)));
            address signer = _recover(digest, sigs[i]);
            if (signer != r.gateway) revert BadSignature(r.id, signer);
            if (!isGateway[signer]) revert NotGateway(signer);
            settled[r.id] = true;
            uint256 amount = uint256(r.amount) * weiPerMicroCredit;
            _draw(r.gateway, amount);
            earningsOf[r.node] += amount;
            emit Settled(r.id, r.node, r.gateway, amount);
        }
    }

    /// Takes `amount` from the gateway's deposit, then from its deposit on
    /// the way out.
    function _draw(address gateway, uint256 amount) private {
        uint256 free = deposits[gateway];
        if (free >= amount) {
            deposits[gateway] = free - amount;
            return;
        }
        uint256 leaving = withdrawing[gateway].amount;
        if (free + leaving < amount) revert InsufficientDeposit(gateway, free + leaving, amount);
        deposits[gateway] = 0;
        withdrawing[gateway].amount = leaving - (amount - free);
    }

    /// Pays the caller what it earned.
    function claim() external {
        uint256 amount = earningsOf[msg.sender];
        if (amount == 0) revert Nothing();
        earningsOf[msg.sender] = 0;
        emit Claimed(msg.sender, amount);
        _send(msg.sender, amount);
    }

    // ------------------------------------------------------------------
    // Slashing
    // ------------------------------------------------------------------

    /// Slashes everything `node` has at stake (unstaking included) for the
    /// conviction (node, model, evidence hash), once `quorum` registered
    /// auditors signed it. `sigs` are sorted by signer address (ascending,
    /// so no auditor counts twice). The caller is the accuser and must be a
    /// registered auditor; it earns `accuserSharePpm` of the stake.
    function slash(address node, bytes32 model, bytes32 evidence, Sig[] calldata sigs) external {
        if (!isGateway[msg.sender]) revert NotGateway(msg.sender);
        bytes32 conviction = keccak256(abi.encode(CONVICTION_TYPEHASH, node, model, evidence));
        if (slashed[conviction]) revert AlreadySlashed(conviction);
        bytes32 digest = _digest(_domainSeparator(), conviction);
        address last = address(0);
        for (uint256 i = 0; i < sigs.length; i++) {
            address signer = _recover(digest, sigs[i]);
            if (signer == address(0)) revert BadSignature(conviction, signer);
            if (signer <= last) revert UnsortedSigners();
            if (!isGateway[signer]) revert NotGateway(signer);
            last = signer;
        }
        if (sigs.length < quorum) revert TooFewSignatures(sigs.length, quorum);
        uint256 amount = stakes[node] + unstaking[node].amount;
        if (amount == 0) revert Nothing();
        stakes[node] = 0;
        unstaking[node].amount = 0;
        slashed[conviction] = true;
        uint256 share = amount * accuserSharePpm / 1_000_000;
        earningsOf[msg.sender] += share;
        burned += amount - share;
        emit Slashed(node, conviction, msg.sender, amount, share);
    }

    // ------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------

    /// Wei `node` has at stake (unstaking amounts not counted).
    function stakeOf(address node) external view returns (uint256) {
        return stakes[node];
    }

    /// Wei of `gateway`'s deposit free to pay receipts (amounts on their way
    /// out not counted).
    function depositOf(address gateway) external view returns (uint256) {
        return deposits[gateway];
    }

    /// The EIP-712 domain separator signatures are made under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparator();
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    function _domainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("Hotpot Market"), keccak256("1"), block.chainid, address(this))
        );
    }

    function _digest(bytes32 domain, bytes32 structHash) private pure returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    /// The signer of `digest`, or address(0) for a malformed or malleable
    /// signature.
    function _recover(bytes32 digest, Sig calldata sig) private pure returns (address) {
        if (uint256(sig.s) > HALF_ORDER || (sig.v != 27 && sig.v != 28)) return address(0);
        return ecrecover(digest, sig.v, sig.r, sig.s);
    }

    function _send(address to, uint256 amount) private {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }
}
