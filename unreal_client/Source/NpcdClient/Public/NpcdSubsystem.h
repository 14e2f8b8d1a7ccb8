#pragma once

#include "CoreMinimal.h"
#include "Subsystems/GameInstanceSubsystem.h"
#include "Tickable.h"
#include "npcd_client.h"
#include "NpcdSubsystem.generated.h"

/** A structured line's action: its name and its arguments, a JSON object ("{}" when it takes none). */
DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdActionChosen, const FString&, RequestId, const FString&, ActionName, const FString&, ArgsJson);
/** A structured line's emotion, one of the persona's labels. */
DECLARE_DYNAMIC_MULTICAST_DELEGATE_TwoParams(FNpcdEmotionChanged, const FString&, RequestId, const FString&, Label);
/** A complete sentence (or clause) of a line with a Segmentation, for text-to-speech: Index 0, 1, 2 ...; the
 *  texts, in order, add up to the line's text exactly. */
DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdSentenceReady, const FString&, RequestId, int32, Index, const FString&, Text);

/** A turn of a dialogue, oldest first: who said it (a player, another NPC) and what; bNpc: said by the
 *  conversation's own NPC (its replies). A line's History reads Speaker and Text only. */
USTRUCT(BlueprintType)
struct NPCDCLIENT_API FNpcdTurn
{
    GENERATED_BODY()

    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    FString Speaker;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    FString Text;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    bool bNpc = false;
};

/** A persona the daemon serves (UNpcdSubsystem::ListPersonas), for a persona dropdown or its voice. */
USTRUCT(BlueprintType)
struct NPCDCLIENT_API FNpcdPersonaInfo
{
    GENERATED_BODY()

    /** What "NPC Say Line" takes as its Persona. */
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    FString Id;
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    FString DisplayName;
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    FString Description;
    /** The persona's game-facing metadata (voice_id, emotion_tags ...), a JSON object; "{}" when none. */
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    FString MetadataJson;
    /** True when it takes new lines (its last good version, if its file's last edit is invalid); false when no
     *  version could be loaded or its file was deleted. Error says why (file, line and field). */
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    bool bServing = false;
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    FString Error;
    /** True when it runs with its own LoRA adapter, false on the base model. */
    UPROPERTY(BlueprintReadOnly, Category = "npcd")
    bool bHasAdapter = false;
};

/** Receives the events of one line, on the game thread. */
class INpcdLineListener
{
public:
    virtual ~INpcdLineListener() = default;
    virtual void OnNpcdEvent(const npcd_event& Event) = 0;
};

/**
 * Owns the one npcd client of the game instance and polls it once per frame on the game
 * thread, handing each event to the listener of its request. No callback ever runs on a
 * gRPC thread. OnAction and OnEmotion fire for the structured lines of every NPC, and OnSentence
 * for every line with a Segmentation (before the line's own listener), for game systems that
 * watch them all (a TTS queue, subtitles).
 */
UCLASS()
class NPCDCLIENT_API UNpcdSubsystem : public UGameInstanceSubsystem, public FTickableGameObject
{
    GENERATED_BODY()

public:
    virtual void Initialize(FSubsystemCollectionBase& Collection) override;
    virtual void Deinitialize() override;

    /** Queues a request for this frame's Tick; returns its id, or an empty string when refused. */
    FString Submit(npcd_request* Request, INpcdLineListener* Listener);
    void Cancel(const FString& RequestId);

    /**
     * The personas the daemon serves. Waits for its answer up to TimeoutMs (0: 5000): call it
     * from a menu or a loading screen, not every frame. False when none came; ErrorCode is then
     * the gRPC status code (14: the daemon is not running, 16: the token was refused).
     */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool ListPersonas(int32 TimeoutMs, TArray<FNpcdPersonaInfo>& Personas, int32& ErrorCode);

    /**
     * What every NPC remembers (lines with a Conversation), for the save game: store Blob as it is (only
     * Persona's conversations unless it is empty). Waits for the daemon up to TimeoutMs (0: 5000); false with
     * ErrorCode (the gRPC code) when it does not answer.
     */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool ExportConversations(const FString& Persona, int32 TimeoutMs, TArray<uint8>& Blob, int32& ErrorCode);
    /** Restores a saved Blob (bReplace: the daemon's memory becomes exactly the save's); Imported: how many
     *  conversations it held. A corrupt blob: false, ErrorCode 3, and nothing stored is lost. */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool ImportConversations(const TArray<uint8>& Blob, bool bReplace, int32 TimeoutMs, int32& Imported, int32& ErrorCode);
    /** What one NPC remembers, for a journal or a quest log: every turn, oldest first. */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool GetConversation(const FString& Conversation, const FString& Persona, int32 TimeoutMs, TArray<FNpcdTurn>& Turns,
                         int32& ErrorCode);
    /** Adds a turn the NPC should remember without a line of its own (bNpc: words put in its mouth). */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool AddTurn(const FString& Conversation, const FString& Persona, const FNpcdTurn& Turn, int32 TimeoutMs, int32& ErrorCode);
    /** Replaces what one NPC remembers with the game's own edit: Turns, oldest first, and a Summary of what came
     *  before them (empty: none). Unlike ResetConversation the conversation is kept. */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool SetConversation(const FString& Conversation, const FString& Persona, const TArray<FNpcdTurn>& Turns,
                         const FString& Summary, int32 TimeoutMs, int32& ErrorCode);
    /** Makes one NPC forget its conversation. */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    bool ResetConversation(const FString& Conversation, const FString& Persona, int32 TimeoutMs, int32& ErrorCode);
    /** Stops delivering a request's events (its listener is going away). */
    void Forget(const FString& RequestId);

    virtual void Tick(float DeltaTime) override;
    virtual TStatId GetStatId() const override;
    virtual bool IsTickable() const override { return Client != nullptr; }
    virtual ETickableTickType GetTickableTickType() const override { return ETickableTickType::Conditional; }

    /** Any line's action (structured lines), on the game thread. */
    UPROPERTY(BlueprintAssignable, Category = "npcd")
    FNpcdActionChosen OnAction;
    /** Any line's emotion (structured lines), on the game thread. */
    UPROPERTY(BlueprintAssignable, Category = "npcd")
    FNpcdEmotionChanged OnEmotion;
    /** Any line's sentences (lines with a Segmentation), on the game thread. */
    UPROPERTY(BlueprintAssignable, Category = "npcd")
    FNpcdSentenceReady OnSentence;

private:
    /** A blocking call's outcome: true for NPCD_OK; else ErrorCode (14 without a client) and a logged warning. */
    bool Called(npcd_status Status, int32 RpcCode, const TCHAR* Call, int32& ErrorCode) const;

    npcd_client* Client = nullptr;
    TMap<FString, INpcdLineListener*> Listeners;
};
